"""Inference: a trained video LLM with its tokenizer and frozen encoder, turning conversations and media into answers.

Every client (eval.py, scripts/web_demo.py, scripts/visualize.py, an API server) parses its own
inputs into SamplingOptions and calls one Engine; the Engine knows nothing of flags or pages.

    engine = Engine.load(weight="sft_video_128", device="cuda")
    pixels, seen = engine.read_media("clip.mp4", "video")
    engine.reply([{"role": "user", "content": "<video>\\nWhat happens?"}], [seen], SamplingOptions())
"""
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset.features import open_cache
from dataset.media import MediaError, read_clip, sampling_rate
from dataset.metrics import GROUNDING_CATEGORIES, exact_match, grounding_score
from dataset.vlm_dataset import ConversationDataset, MediaEntry, VisualInputs, collate, visual_inputs
from model.chat import BadSample, ChatEncoder, TokenizerError, check_turns, load_tokenizer, marker_kinds
from model.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from model.choices import ranked_choices
from model.lora import LoraError, apply_adapter, base_of, find_adapter, read_info
from model.video_summary import media_slot_counts, visual_token_counts
from model.vision import FrameEncoder, VisionWeightsError

MEDIA_KINDS = ("video", "image")
DEFAULT_TOKENIZER = "model/tokenizer"


class EngineError(Exception):
    """Input the engine cannot use (a conversation, media, options, a data file); the message is one line."""


# What clients show as one `error: ...` line instead of a traceback: a bad checkpoint, adapter,
# tokenizer, vision weights, media file or input. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (EngineError, CheckpointError, LoraError, TokenizerError, VisionWeightsError, MediaError, BadSample,
                FileNotFoundError)


@dataclass(frozen=True)
class SamplingOptions:
    """How an answer's tokens are picked. <|im_end|> always ends an answer; each `stop` string ends it
    too, the answer cut just before it (a string or a sequence of strings, as an OpenAI-style `stop`)."""
    max_new_tokens: int = 64
    temperature: float = 0.0   # 0: greedy
    top_p: float = 0.9         # nucleus mass kept when sampling
    seed: int = 0              # same seed and options, same sampled answer
    stop: tuple = ()

    def __post_init__(self):
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)   # frozen: normalised once, here
        if not all(isinstance(s, str) and s for s in stop):
            raise EngineError(f"stop: expected non-empty strings, got {stop!r}")
        if self.max_new_tokens < 0:
            raise EngineError(f"max_new_tokens must be 0 or more, not {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be 0 (greedy) or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass
class AnsweredBatch:
    """One batch of a data file: a prediction dict per usable record, and how many records it skipped."""
    predictions: list
    skipped: int


def generate_tokens(model, input_ids, attention_mask, visual: VisualInputs, options: SamplingOptions, end_id=None,
                    compiled=False):
    """The next token of every (left-padded) row, step by step, picked as `options` say; a row that
    produced end_id keeps yielding it. The token level of Engine.generate_batch (bench.py times it).
    compiled: static-shape decoding steps through torch.compile (model/static_decode.py)."""
    generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)
    yield from model.generate(input_ids, attention_mask, visual.features, visual.frame_mask, options.max_new_tokens,
                              options.temperature, options.top_p, eos_id=end_id, generator=generator,
                              frame_times=visual.frame_times, compiled=compiled)


class AnswerText:
    """One row's answer as its tokens arrive: the text they spell, ended by end_id or a stop string."""

    def __init__(self, tokenizer, end_id: int, stop=()):
        self.tokenizer, self.end_id, self.stop = tokenizer, end_id, stop
        self.ids, self.done = [], False
        self._decoded = (0, "")   # (token count, their text): decode once per new token

    def add(self, token: int):
        if self.done:
            return
        if token == self.end_id:
            self.done = True
            return
        self.ids.append(token)
        self.done = bool(self.stop) and len(self.text) < len(self.raw)   # a stop string appeared

    @property
    def raw(self) -> str:
        if self._decoded[0] != len(self.ids):
            self._decoded = (len(self.ids), self.tokenizer.decode(self.ids, skip_special_tokens=True))
        return self._decoded[1]

    @property
    def text(self) -> str:
        """The answer so far, up to its first stop string."""
        raw = self.raw
        found = [i for i in (raw.find(s) for s in self.stop) if i >= 0]
        return raw[:min(found)] if found else raw

    def settled(self) -> str:
        """The part of the text no later token can change, safe to show now: a character still waiting
        for bytes (shown as U+FFFD) and a tail that may grow into a stop string are held back."""
        text = self.text
        if self.done:
            return text
        text = text.rstrip("\ufffd")
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - held]


class Engine:
    """A model on a device with its tokenizer and chat format; the frozen encoder loads on first need."""

    def __init__(self, model, tokenizer, device="cpu", name="in-memory model", compile_decoding=False):
        self.device = torch.device(device)
        # Compiled decoding steps pay a one-off compile (tens of seconds on a CPU) per batch size and
        # cache size: worth it for a chat, not for a data file's batches of changing shapes.
        self.compile_decoding = compile_decoding
        self.model = model.to(self.device).eval()
        self.tokenizer, self.name = tokenizer, name
        self.chat = ChatEncoder(tokenizer, model.vision_cfg.num_visual_tokens)
        self._encoder = None

    @classmethod
    def load(cls, weight=None, lora=None, out_dir="out", device="cpu", tokenizer=None, clip_pretrained=None,
             compile_decoding=False):
        """An Engine on a checkpoint (a path or a name in out_dir), or on a LoRA adapter folder merged onto
        its base (`weight` if given, else the base the adapter names). The tokenizer is the one the
        checkpoint names unless `tokenizer` is given; clip_pretrained overrides its vision weights."""
        if not weight and not lora:
            raise EngineError("give a checkpoint (weight) or a LoRA adapter folder (lora)")
        checkpoint = find_checkpoint(weight, out_dir) if weight else None
        adapter = find_adapter(lora, out_dir) if lora else None
        path = base_of(adapter, checkpoint) if adapter else checkpoint
        model, meta = load_checkpoint(path, "cpu", clip_pretrained=clip_pretrained)
        if adapter:
            model = apply_adapter(model, adapter, merge=True)
            meta = {**meta, **read_info(adapter)}
        tokenizer_dir = tokenizer or meta.get("tokenizer", DEFAULT_TOKENIZER)
        if not Path(tokenizer_dir).is_dir():
            raise EngineError(f"{tokenizer_dir}: tokenizer folder not found (pass --tokenizer)")
        name = f"{adapter} (LoRA on {path.name})" if adapter else str(path)
        return cls(model, load_tokenizer(tokenizer_dir), device, name, compile_decoding)

    @property
    def encoder(self) -> FrameEncoder:
        if self._encoder is None:
            self._encoder = FrameEncoder(self.model.vision_cfg, self.device)
        return self._encoder

    @property
    def max_seq_len(self) -> int:
        return self.model.lm_cfg.max_seq_len

    # ------------------------------------------------------------ media

    def read_media(self, path, kind: str):
        """(pixels, seen) of one file: the uint8 frames (T, H, W, 3) sampled as in training, and what the
        model sees of it, a MediaEntry of their CLIP features (T, d) and times (T,) in seconds."""
        if kind not in MEDIA_KINDS:
            raise EngineError(f"{path}: media kind {kind!r}, expected one of {', '.join(MEDIA_KINDS)}")
        cfg = self.model.vision_cfg
        clip = read_clip(path, kind, cfg.num_frames, sampling_rate(cfg), cfg.reads_frame_times)
        return clip.pixels, MediaEntry("features", self.encoder.encode(clip.pixels), torch.from_numpy(clip.times))

    def read_attachments(self, image=None, video=None):
        """(what the model sees of each given file, the markers a first user turn starts with): the
        image before the video, as eval.py and the exported transformers model put them."""
        media, markers = [], ""
        for kind, path in (("image", image), ("video", video)):
            if path:
                media.append(self.read_media(str(path), kind)[1])
                markers += f"<{kind}>\n"
        return media, markers

    def to(self, device):
        """Move the model (and the encoder, once loaded) to another device."""
        self.device = torch.device(device)
        self.model.to(self.device)
        if self._encoder is not None:
            self._encoder = FrameEncoder(self.model.vision_cfg, self.device)
        return self

    # ------------------------------------------------------------ answering

    def prompt_ids(self, conversation, media=()) -> list:
        """The token ids the model reads to answer `conversation`, ending with the assistant prompt."""
        try:
            check_turns(conversation)
            kinds = marker_kinds(conversation)
        except BadSample as e:
            raise EngineError(f"conversation: {e}") from None
        if conversation[-1]["role"] != "user":
            raise EngineError("conversation: the last turn must be the user's (the one to answer)")
        if len(kinds) != len(media):
            raise EngineError(f"conversation: {len(kinds)} <video>/<image> marker(s) for {len(media)} media item(s)")
        entries = [seen_entry(item) for item in media]
        for i, entry in enumerate(entries):
            self._check_features(i, entry)
        counts = media_slot_counts(self.model.vision_cfg, entries)
        return self.chat.encode(conversation, add_generation_prompt=True, slot_counts=counts)[0]

    def reply(self, conversation, media=(), options=SamplingOptions(), stream=None) -> str:
        """The assistant's next answer to `conversation` (user/assistant turns, ending with the user's),
        whose user turns carry one <video>/<image> marker per item of `media`, in order: what read_media
        saw of each (or its CLIP features alone, (T, d), when the frame times are not needed).

        stream(delta), if given, is called once per generated token and once at the end, with what
        the answer gained (empty while a character or a possible stop string is held back); the
        pieces join to the answer (before its surrounding whitespace is stripped).
        """
        ids = self.prompt_ids(conversation, media)
        visual = visual_inputs([seen_entry(item) for item in media], None, self.device)
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.bool)}
        return self.generate_batch(batch, visual, options, stream)[0]

    def generate_batch(self, batch, visual=VisualInputs(), options=SamplingOptions(), stream=None) -> list:
        """The answer of every row of a left-padded batch ({"input_ids", "attention_mask"}), its visual
        slots filled from `visual` (features (N, T, d), frame_mask and frame_times (N, T); empty for
        text only); `stream(delta)` gets row 0's answer as it grows."""
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        visual = VisualInputs(*(None if t is None else t.to(self.device) for t in visual))
        self._check_prompt(ids, visual)
        answers = [AnswerText(self.tokenizer, self.chat.im_end, options.stop) for _ in range(len(ids))]
        shown = ""
        steps = generate_tokens(self.model, ids, mask, visual, options, end_id=self.chat.im_end,
                                compiled=self.compile_decoding)
        with closing(steps):   # closed at once when a stop string ends every row early
            for step in steps:
                for answer, token in zip(answers, step.tolist()):
                    answer.add(token)
                if stream:
                    shown = push(stream, shown, answers[0].settled())
                if all(a.done for a in answers):
                    break
        if stream:
            push(stream, shown, answers[0].text)
        return [a.text.strip() for a in answers]

    def _check_features(self, i, entry: MediaEntry):
        cfg, features = self.model.vision_cfg, entry.values
        if cfg.reads_frame_times and (entry.times is None or not bool(torch.isfinite(entry.times).all())):
            raise EngineError(f"media item {i}: this model reads each frame's time in seconds, and they are "
                              f"not known (pass what read_media returns, not bare features)")
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[-1] != cfg.clip_dim:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise EngineError(f"media item {i}: expected CLIP features (frames, {cfg.clip_dim}), got {shape}")
        if not 1 <= len(features) <= cfg.num_frames:
            raise EngineError(f"media item {i}: {len(features)} frames, the model takes 1 to {cfg.num_frames}")

    def _check_prompt(self, ids, visual: VisualInputs):
        if ids.shape[1] + 1 > self.max_seq_len:
            raise EngineError(f"the prompt is {ids.shape[1]} tokens, longer than the model's context "
                              f"({self.max_seq_len}) leaves room for")
        cfg = self.model.vision_cfg
        slots = int((ids == cfg.vision_token_id).sum())
        media = 0 if visual.features is None else visual.features.shape[0]
        wanted = int(visual_token_counts(cfg, visual.frame_mask, visual.frame_times).sum()) if media else 0
        if slots != wanted:
            raise EngineError(f"{slots} visual slots in the prompt for {media} media item(s) with {wanted} visual tokens")

    # ------------------------------------------------------------ data files

    def answer_dataset(self, data_path, options=SamplingOptions(), batch_size=32, media_root=None,
                       feature_dir=None, strict=False, grounding_categories=GROUNDING_CATEGORIES):
        """Answer every record of a jsonl (its last assistant turn is the reference) in left-padded
        batches, in file order: yields an AnsweredBatch per batch. Unusable records are skipped with a
        warning and counted; with strict, the first one raises EngineError instead.

        A prediction: id, category, subset, prediction, reference, references (the last assistant
        turn plus the record's optional "references") and correct (normalised exact match); plus the
        record's duration and phrasing when it has them, and for a grounding question (a record "span",
        or a category in grounding_categories) the true span and the answer's temporal iou; for a
        multiple-choice record ("choices"), the likeliest choice and whether it is right (model/choices.py).
        """
        loader, encoder = self._data_loader(data_path, batch_size, media_root, feature_dir, strict)
        for batch in loader:
            if strict and batch["errors"]:   # raised here, not in a loader worker: one line, no traceback
                raise EngineError(batch["errors"][0])
            if not batch["size"]:
                yield AnsweredBatch([], batch["skipped"])
                continue
            visual = visual_inputs(batch["media"], encoder, self.device)
            answers = self.generate_batch(batch, visual, options)
            ranked = ranked_choices(self.model, batch, visual, self.chat.pad_id)
            rows = [prediction(batch, i, a, grounding_categories, ranked[i]) for i, a in enumerate(answers)]
            yield AnsweredBatch(rows, batch["skipped"])

    def _data_loader(self, data_path, batch_size, media_root, feature_dir, strict):
        """(DataLoader of left-padded batches, the encoder when some media is not in the feature cache)."""
        if not Path(data_path).exists():   # a jsonl or parquet file, or a dataset folder
            raise EngineError(f"{data_path}: no such file")
        cfg = self.model.vision_cfg
        data_dir = Path(media_root) if media_root else Path(data_path).parent
        data = ConversationDataset(data_path, self.chat, cfg.num_frames, self.max_seq_len, media_root=media_root,
                                   cache=open_cache(data_dir, cfg, feature_dir), for_generation=True,
                                   fps=sampling_rate(cfg), need_times=cfg.reads_frame_times,
                                   slot_counts=partial(media_slot_counts, cfg))
        encoder = self.encoder if data.uncached() else None
        if encoder:
            data.preprocess = encoder.clip_inputs   # pixels are decoded and transformed in the loader's workers
        loader = DataLoader(data, batch_size=batch_size, num_workers=2 if encoder else 0,
                            collate_fn=partial(collate, pad_id=self.chat.pad_id, left_pad=True,
                                               warn_skipped=not strict))
        return loader, encoder


def seen_entry(item) -> MediaEntry:
    """What reply takes per media item: read_media's MediaEntry, or bare CLIP features (times unknown)."""
    return item if isinstance(item, MediaEntry) else MediaEntry("features", item)


def push(stream, shown: str, text: str) -> str:
    """Send stream() what `text` adds to what was shown (maybe nothing: every step is a sign of
    progress to a client); returns what is shown now."""
    if len(text) > len(shown):
        stream(text[len(shown):])
        return text
    stream("")
    return shown


def prediction(batch, i: int, answer: str, grounding_categories=GROUNDING_CATEGORIES, ranked=None) -> dict:
    refs = batch["references"][i]
    row = {"id": batch["id"][i], "category": batch["category"][i], "subset": batch["subset"][i],
           "prediction": answer, "reference": batch["reference"][i], "references": refs,
           "correct": exact_match(answer, refs)}
    if ranked is not None:   # a multiple-choice record: the likeliest offered answer, scored beside the generated one
        choice, scores = ranked
        row.update(choices=batch["choices"][i], choice_scores=[round(x, 4) for x in scores], choice=choice,
                   choice_correct=exact_match(choice, refs), answered_a_choice=exact_match(answer, batch["choices"][i]))
    # Exact match above still decides "correct"; the span adds its own score beside it.
    row.update(grounding_score(answer, row["reference"], row["category"], record_field(batch, "span", i),
                               grounding_categories))
    for key in ("duration", "phrasing"):
        if record_field(batch, key, i) is not None:
            row[key] = record_field(batch, key, i)
    return row


def record_field(batch, key: str, i: int):
    """The batch's optional per-record field, None where the record (or an older batch) lacks it."""
    return batch[key][i] if key in batch else None
