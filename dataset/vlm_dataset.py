"""jsonl conversations → token ids, assistant-only labels and per-media clip inputs or cached features."""
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.annotations import AnnotationStore, parse_line
from dataset.media import MediaError, read_clip
from dataset.packing import packed_batch, packed_rows
from dataset.metrics import PHRASINGS
from model.chat import IGNORE, BadSample, check_turns, marker_kinds


class MediaEntry(NamedTuple):
    """One media item of a sample as the model will see it: kind "features" (cached CLIP features, (T, d))
    or "clip_inputs" (the tower's input, (T, 3, S, S), encoded at batch time), and the time in seconds of
    each of its T frames (None where unknown: features cached before times were kept)."""
    kind: str
    values: torch.Tensor
    times: torch.Tensor = None


class VisualInputs(NamedTuple):
    """A batch's media for the model: features (N, T, d) padded to the longest, frame_mask (N, T) False on
    padding, frame_times (N, T) seconds (NaN where unknown or padded); all None without media."""
    features: torch.Tensor = None
    frame_mask: torch.Tensor = None
    frame_times: torch.Tensor = None


def as_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_jsonl(path):
    """→ list of (line number, record or an error string for a malformed line): for one-pass scripts
    (converters, cleaning); the datasets read through the annotation store instead."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append((n, parse_line(line.encode("utf-8"))))
    return rows


def media_pools(record, kinds) -> dict:
    """{"image": [paths], "video": [paths]}; BadSample unless each item has exactly one marker."""
    pools = {}
    for kind in ("image", "video"):
        value = record.get(kind)
        if not (value is None or isinstance(value, str)
                or isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise BadSample(f"'{kind}' must be a path or a list of paths, not {type(value).__name__}")
        pools[kind] = as_list(value)
        count = kinds.count(kind)
        if count != len(pools[kind]):
            raise BadSample(f"{count} <{kind}> marker(s) for {len(pools[kind])} {kind} item(s)")
    return pools


class ConversationDataset(Dataset):
    """Samples in the jsonl schema of docs/data-format.md.

    Training items carry the whole conversation with labels; with for_generation=True the last
    assistant turn becomes the reference and the ids end with the assistant prompt, and
    "references" lists it together with the record's optional "references" (more acceptable
    answers or captions, e.g. several human captions of one video; ignored in training), and the
    optional "span", "duration" and "phrasing" are checked and carried (None where absent) for scoring.
    An unusable sample comes back as {"error": one line naming the file}; with strict=True it raises.
    """

    def __init__(self, jsonl_path, chat, num_frames: int, max_len: int, media_root=None,
                 cache=None, preprocess=None, for_generation=False, strict=False, fps=None, need_times=False,
                 slot_counts=None):
        self.path = str(jsonl_path)
        self.store = AnnotationStore(jsonl_path)   # memory-mapped, built once per version of the file
        self.rows = np.arange(len(self.store))     # the store rows this dataset holds (a hold-out keeps some)
        self.chat, self.num_frames, self.max_len = chat, num_frames, max_len
        self.fps = fps   # None: uniform frame sampling; else frames a second (dataset/media.py)
        self.media_root = Path(media_root) if media_root else Path(jsonl_path).parent
        self.cache, self.preprocess = cache, preprocess
        self.for_generation, self.strict = for_generation, strict
        self.need_times = need_times   # the model reads frame times: a media without a clock is unusable
        # slot_counts(media) → each media's visual tokens, when they vary with duration (None: K each)
        self.slot_counts = slot_counts

    def __len__(self):
        return len(self.rows)

    def media_keys(self) -> set:
        return self.store.media_keys(self.rows)

    def size_hints(self) -> np.ndarray:
        """A cheap length per sample (characters of its turns + 32 per media item), for batching alike lengths."""
        return self.store.hints[self.rows]

    def uncached(self) -> set:
        """Media whose features must be computed online (not in the feature cache)."""
        return {k for k in self.media_keys() if self.cache is None or k not in self.cache}

    def __getitem__(self, i):
        line, record = self.store.record(self.rows[i])
        try:
            if isinstance(record, str):
                raise BadSample(record)
            return self._build(record)
        except (BadSample, MediaError) as e:
            message = f"{self.path}:{line}: {e}"
            if self.strict:
                raise BadSample(message) from None
            return {"error": message}

    def _build(self, record):
        conversations = record.get("conversations")
        reference = None
        if self.for_generation:
            if not isinstance(conversations, list) or not conversations \
                    or not isinstance(conversations[-1], dict) or conversations[-1].get("role") != "assistant":
                raise BadSample("the last turn must be the assistant's reference answer")
            reference = conversations[-1].get("content", "")
            conversations = conversations[:-1]
        check_turns(conversations)
        media = self._media(record, marker_kinds(conversations))   # first: a media's slots may follow its duration
        counts = None if self.slot_counts is None else self.slot_counts(media)
        ids, labels, _ = self.chat.encode(conversations, add_generation_prompt=self.for_generation,
                                          slot_counts=counts)
        if not self.for_generation and all(x == IGNORE for x in labels):
            raise BadSample("no assistant turn to learn from")
        if len(ids) > self.max_len:
            raise BadSample(f"{len(ids)} tokens, longer than max_len={self.max_len}")
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "media": media,
                "id": record.get("id", ""), "category": record.get("category", ""),
                "subset": record.get("subset", "")}
        if reference is not None:
            item["reference"] = reference
            item["references"] = [reference] + [r for r in extra_references(record) if r != reference]
            item.update(timing_fields(record))
            item["choices"] = choice_field(record)
            item["choice_ids"] = [self._choice_ids(len(ids), c) for c in item["choices"] or ()]
        return item

    def _choice_ids(self, prompt_len: int, choice: str) -> list:
        """The tokens a reply of `choice` adds after the prompt (as training encodes an answer: text, end token)."""
        answer = self.chat.text(choice) + [self.chat.im_end]
        if prompt_len + len(answer) > self.max_len:
            raise BadSample(f"answered with the choice {shown(choice)}, {prompt_len + len(answer)} tokens, longer "
                            f"than max_len={self.max_len}")
        return answer

    def _media(self, record, kinds):
        """One MediaEntry per marker, in marker order: cached features, or clip inputs to encode.

        self.preprocess turns decoded pixels into clip inputs (FrameEncoder.clip_inputs): in a DataLoader
        worker, so the main process only runs the tower."""
        pools = media_pools(record, kinds)
        taken = {"image": 0, "video": 0}
        media, offset = [], time_offset(record)
        for kind in kinds:
            rel, shift = pools[kind][taken[kind]], offset if kind == "video" else 0.0   # an image has no clock
            taken[kind] += 1
            cached = self.cache.get(rel) if self.cache is not None else None
            if cached is not None:
                clock = self.cache.get_times(rel)
                if self.need_times and clock is None:   # FeatureWriter keeps only finite times
                    raise BadSample(f"{rel}: cached without frame times, which this model reads")
                media.append(MediaEntry("features", cached, None if clock is None else clock[0] + shift))
                continue
            if self.preprocess is None:
                raise BadSample(f"{rel}: not in the feature cache and no encoder to compute it")
            clip = read_clip(self.media_root / rel, kind, self.num_frames, self.fps, self.need_times)
            media.append(MediaEntry("clip_inputs", self.preprocess(clip.pixels), torch.from_numpy(clip.times) + shift))
        return media


def time_offset(record) -> float:
    """The record's optional "time_offset" (seconds, >= 0, default 0): its media are windows of a longer
    recording, and every frame time is moved onto that recording's clock, the one its text uses."""
    offset = record.get("time_offset", 0.0)
    if not (is_number(offset) and offset >= 0):
        raise BadSample(f'"time_offset" must be a number of seconds >= 0, not {shown(offset)}')
    return float(offset)


def extra_references(record) -> list:
    """The record's optional "references": a string or a list of strings."""
    extra = record.get("references", [])
    extra = [extra] if isinstance(extra, str) else extra
    if not isinstance(extra, list) or not all(isinstance(r, str) for r in extra):
        raise BadSample('"references" must be a string or a list of strings')
    return list(dict.fromkeys(extra))   # drop repeats, keep order


def choice_field(record) -> list | None:
    """The record's optional "choices": the answers a multiple-choice question offers (2 or more distinct
    strings), ranked by the model's likelihood beside its generated answer; None where absent."""
    choices = record.get("choices")
    if choices is None:
        return None
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)
            and len(set(choices)) == len(choices)):
        raise BadSample(f'"choices" must be a list of 2 or more distinct non-empty strings, not {shown(choices)}')
    return choices


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def shown(value, limit=40) -> str:
    """A field's value for an error line, cut short so the line stays readable."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def timing_fields(record) -> dict:
    """The record's optional "span" [start, end] and "duration" (seconds) and "phrasing" ("seen" / "held_out"),
    None where absent; BadSample when one is malformed, so a bad field never reaches the scores."""
    span, duration, phrasing = record.get("span"), record.get("duration"), record.get("phrasing")
    if span is not None and not (isinstance(span, list) and len(span) == 2 and all(map(is_number, span))
                                 and span[0] <= span[1]):
        raise BadSample(f'"span" must be [start, end] in seconds with end >= start, not {shown(span)}')
    if duration is not None and not (is_number(duration) and duration >= 0):
        raise BadSample(f'"duration" must be a number of seconds >= 0, not {shown(duration)}')
    if phrasing is not None and phrasing not in PHRASINGS:
        raise BadSample(f'"phrasing" must be one of {", ".join(PHRASINGS)}, not {shown(phrasing)}')
    return {"span": None if span is None else [float(x) for x in span],
            "duration": None if duration is None else float(duration), "phrasing": phrasing}


def warn(message):
    print(f"warning: skipped {message}", file=sys.stderr, flush=True)


def collate(items, pad_id: int, left_pad=False, warn_skipped=True, pack=False):
    """Pad ids (right for training, left for generation); keep media in batch order. With pack (training),
    conversations share rows where that saves rows (dataset/packing.py), and media follow their slots.

    Unusable items are dropped, with a warning unless warn_skipped=False (--strict: the caller stops
    with the error instead); batch["skipped"] counts them and batch["errors"] says why. Padding items
    (a distributed sampler's empty slots, {"padding": True}) are dropped silently: they are no samples.
    """
    errors = [item["error"] for item in items if "error" in item]
    for error in errors if warn_skipped else []:
        warn(error)
    good = [item for item in items if "error" not in item and not item.get("padding")]
    batch = {"skipped": len(errors), "size": len(good), "errors": errors}
    if not good:
        return batch
    rows = packed_rows(good) if pack and not left_pad else None
    if rows is not None:
        batch.update(packed_batch(good, rows, pad_id))
        return batch
    width = max(len(it["input_ids"]) for it in good)
    ids = torch.full((len(good), width), pad_id, dtype=torch.long)
    labels = torch.full((len(good), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(good), width), dtype=torch.bool)
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, cols], labels[row, cols], mask[row, cols] = it["input_ids"], it["labels"], True
    batch.update(input_ids=ids, labels=labels, attention_mask=mask,
                 media=[m for it in good for m in it["media"]])
    for key in ("id", "category", "subset", "reference", "references", "span", "duration", "phrasing", "choices",
                "choice_ids"):
        if key in good[0]:
            batch[key] = [it.get(key) for it in good]
    batch["media_counts"] = [len(it["media"]) for it in good]
    return batch


def visual_inputs(media, encoder=None, device="cpu") -> VisualInputs:
    """MediaEntry items (or (kind, values[, times]) tuples) → the batch's VisualInputs, on `device`.

    Clip inputs go through the frozen encoder in one batch; cached features are used as they are.
    """
    if not media:
        return VisualInputs()
    media = [MediaEntry(*entry) for entry in media]
    inputs = [m.values for m in media if m.kind == "clip_inputs"]
    if inputs:
        if encoder is None:
            raise ValueError("media needs the vision encoder but none was loaded")
        encoded = iter(encoder.encode_inputs(torch.cat(inputs)).split([len(x) for x in inputs]))
    feats = [next(encoded) if m.kind == "clip_inputs" else m.values for m in media]
    T = max(len(f) for f in feats)
    out = torch.zeros(len(feats), T, feats[0].shape[-1])
    mask = torch.zeros(len(feats), T, dtype=torch.bool)
    times = torch.full((len(feats), T), float("nan"))
    for i, (f, m) in enumerate(zip(feats, media)):
        out[i, :len(f)], mask[i, :len(f)] = f.float(), True
        if m.times is not None:
            times[i, :len(f)] = m.times.float()
    return VisualInputs(out.to(device), mask.to(device), times.to(device))
