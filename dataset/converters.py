"""Public video-instruction datasets → records in our jsonl schema: one converter per source format.

Each converter takes one source record and returns one record of ours (a list when one source record
gives several), or raises Skip naming why. READERS says how a source file that is not a JSON list or
jsonl (a text file, a csv, a JSON object keyed by video) is read into records.
Shared steps (roles, markers, media paths, validation) live in build(); validation reuses the
loader's own checks (model.chat.check_turns, dataset.vlm_dataset.media_pools), so a converted
record is one ConversationDataset accepts.
"""
import csv
import json
import math
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from dataset.embedded_images import BadImageBytes, byte_list, save_image
from dataset.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from dataset.tables import TableError, is_table, record_batches
from dataset.timespan import format_span
from dataset.vlm_dataset import media_pools, read_jsonl
from model.chat import MEDIA_MARKER, BadSample, check_turns, marker_kinds

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# MiniMind-V's loader expands <image> to '@'*196, Cinego's to '@'*197; a file holding such a run
# still means one image.
EXPANDED_PLACEHOLDER = re.compile(r"@{196,197}")
# Tried in this order by --video_ext auto (ActivityNet, for one, mixes mp4, mkv and webm).
AUTO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")
DEFAULT_CAPTION_PROMPT = "Describe the video in detail."
KEYFRAME_PROMPT = "Describe what happens in the video, step by step."


class SourceError(Exception):
    """The input as a whole cannot be read; the message names the file and the problem in one line."""


class Skip(Exception):
    """One source record cannot be converted; `reason` is a short key for the end-of-run counts."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Options:
    """How source media names become our paths, plus the per-format choices the CLI exposes."""
    out_dir: str = "."                 # folder of the output jsonl (our loader resolves paths from there)
    media_root: str | None = None      # folder the source's media paths / ids are relative to
    video_ext: str | None = None       # id-only formats: ".mp4", ".avi", ... or "auto"; None = the format's own
    category: str | None = None        # overrides every format's default category
    category_from_question: bool = False   # QA formats: category = the question word (what/who/how/...)
    caption_prompt: str = DEFAULT_CAPTION_PROMPT
    keyframe_turn: bool = False        # ShareGPT4Video: add the keyframe captions as a second turn
    msvd_mapping: dict | None = None   # MSVD-QA: "vid1" → YouTube clip name (youtube_mapping.txt)
    nextqa_mapping: dict | None = None  # NExT-QA: video id → "<folder>/<video id>" (map_vid_vidorID.json)
    id_prefix: str = ""                # ids for records without one: <prefix>_<index> (default: input file stem)
    image_dir: str | None = None       # MiniMind-V parquet: where its embedded images are written (by content)

    def place(self, path: str) -> str:
        """A source media path → ours: relative to out_dir when media_root is given, else kept as it is."""
        if self.media_root is None or os.path.isabs(path):
            return path
        return rebase_media_path(path, self.media_root, self.out_dir)

    def video_file(self, stem: str, default_ext: str) -> str:
        """File name for a dataset that names videos by id only."""
        ext = self.video_ext or default_ext
        if ext != "auto":
            return stem + (ext if ext.startswith(".") else "." + ext)
        for suffix in AUTO_SUFFIXES:
            if os.path.isfile(os.path.join(self.media_root, stem + suffix)):
                return stem + suffix
        raise Skip("video_not_found", f"no {stem}{{{','.join(AUTO_SUFFIXES)}}} in {self.media_root}")


def rebase_media_path(path: str, from_dir, to_dir) -> str:
    """`path` relative to from_dir → the same file relative to to_dir (absolute paths stay as they are)."""
    if os.path.isabs(path):
        return path
    full = os.path.abspath(os.path.join(from_dir, path))
    return Path(os.path.relpath(full, os.path.abspath(to_dir))).as_posix()


# ---------------------------------------------------------------- reading sources

def read_source(path, fmt=None):
    """Yield (where, record or an error string) from the source file, read the way `fmt` publishes it
    (READERS; by default a JSON list file or a jsonl file)."""
    path = str(path)
    if is_table(path) and os.path.exists(path):
        yield from read_table_rows(path)
        return
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    try:
        yield from READERS.get(fmt, read_json_records)(path)
    except UnicodeDecodeError:
        raise SourceError(f"{path}: not UTF-8 text") from None


def read_table_rows(path):
    """A parquet file's (or save_to_disk folder's) rows as they are, numbered from 1."""
    try:
        rows = (row for batch in record_batches(path) for row in batch)
        for n, row in enumerate(rows, 1):
            yield f"{path}:row {n}", row
    except TableError as e:
        raise SourceError(str(e)) from None


def read_json_records(path):
    if not path.endswith(".jsonl"):
        data = load_json(path, allow_jsonl=True)
        if data is not None:
            if not isinstance(data, list):
                raise SourceError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
            for i, record in enumerate(data):
                yield f"{path}[{i}]", record if isinstance(record, dict) else "item is not a JSON object"
            return
    for n, record in read_jsonl(path):
        yield f"{path}:{n}", record


def load_json(path, allow_jsonl=False):
    """The file's JSON value; with allow_jsonl, None when it holds several objects (jsonl under a .json name)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        if allow_jsonl and e.msg == "Extra data":
            return None
        raise SourceError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None


def read_json_by_video(path):
    """A JSON object keyed by video id (ActivityNet Captions) → one record per video, its key as "video_id"."""
    data = load_json(path)
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object keyed by video id, found {type(data).__name__}")
    for i, (video_id, record) in enumerate(data.items()):
        yield f"{path}[{i}]", {**record, "video_id": video_id} if isinstance(record, dict) else \
            f"the value for {video_id!r} is not a JSON object"


def read_text_lines(path):
    """One record {"line": text} per non-blank line, for line-based annotation files (Charades-STA)."""
    with open(path, encoding="utf-8-sig") as f:   # -sig: a byte-order mark is not part of the first id
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", {"line": line.strip()}


def read_csv_rows(path, columns):
    """One record per csv row, keyed by the header; a header lacking any of `columns` is a SourceError."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f)
        missing = [c for c in columns if c not in (rows.fieldnames or [])]
        if missing:
            raise SourceError(f"{path}: the csv header lacks column(s) {', '.join(missing)}")
        try:
            for row in rows:
                yield f"{path}:{rows.line_num}", row
        except csv.Error as e:
            raise SourceError(f"{path}:{rows.line_num}: not valid csv ({e})") from None


def read_msvd_mapping(path) -> dict:
    """youtube_mapping.txt ("<youtube clip name> vid<N>" per line) → {"vid<N>": clip name}."""
    mapping = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2 or not parts[1].startswith("vid"):
                    raise SourceError(f"{path}:{n}: expected '<clip name> vid<N>', got {line.strip()[:60]!r}")
                mapping[parts[1]] = parts[0]
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror})") from None
    return mapping


def read_nextqa_mapping(path) -> dict:
    """map_vid_vidorID.json ({"<video id>": "<folder>/<video id>"}) → that dict; paths are without extension."""
    path = str(path)
    if not os.path.isfile(path):
        raise SourceError(f"{path}: no such file")
    mapping = load_json(path)
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise SourceError(f"{path}: expected a JSON object of video id → '<folder>/<video id>'")
    return mapping


# ---------------------------------------------------------------- shared steps

def text_field(record, key) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Skip("missing_field", f"missing or empty {key!r}")
    return value


def id_field(record, key) -> str:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Skip("missing_field", f"missing {key!r}")
    return str(value)


def path_list(value, key) -> list:
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise Skip("missing_field", f"{key!r} must be a path or a list of paths")


def read_turns(conversations) -> list:
    """LLaVA {"from","value"} or {"role","content"} turns → ours; roles mapped (human→user, gpt→assistant)."""
    if not isinstance(conversations, list) or not conversations:
        raise Skip("missing_field", "missing or empty 'conversations'")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise Skip("bad_conversation", f"turn {i} is not an object")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if role not in ROLES:
            raise Skip("bad_role", f"turn {i} has role {role!r} (known: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise Skip("bad_conversation", f"turn {i} has no text")
        turns.append({"role": ROLES[role], "content": content})
    return turns


def qa_turns(question: str, answer: str) -> list:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def place_markers(turns, kinds, retag=True) -> list:
    """One marker per media item: prepended to the first user turn when the text has none;
    otherwise existing markers are re-tagged in order to the media kinds (LLaVA writes <image> for videos)."""
    found = marker_kinds(turns)
    if not kinds or (found and not retag):
        return turns
    if not found:
        first_user = next((t for t in turns if t["role"] == "user"), None)
        if first_user is None:
            raise Skip("bad_conversation", "no user turn to hold the media marker")
        first_user["content"] = "".join(f"<{k}>\n" for k in kinds) + first_user["content"]
        return turns
    if len(found) != len(kinds):
        raise Skip("marker_count", f"{len(found)} marker(s) in the text for {len(kinds)} media item(s)")
    order = iter(kinds)
    for turn in turns:
        if turn["role"] == "user":
            turn["content"] = MEDIA_MARKER.sub(lambda m: f"<{next(order)}>", turn["content"])
    return turns


def build(record_id, turns, media, opts: Options, category=None, source=None, retag=True) -> dict:
    """Our record from turns and [(kind, source path)] in marker order; Skip if the loader would reject it."""
    turns = place_markers(turns, [kind for kind, _ in media], retag)
    record = {"id": record_id}
    for kind in ("video", "image"):
        paths = [opts.place(p) for k, p in media if k == kind]
        if paths:
            record[kind] = paths[0] if len(paths) == 1 else paths
    record["conversations"] = turns
    category = opts.category or category
    if category:
        record["category"] = category
    if source:
        record["source"] = source
    try:
        check_turns(turns)
        media_pools(record, marker_kinds(turns))
    except BadSample as e:
        reason = "marker_count" if "marker" in str(e) else "bad_conversation"
        raise Skip(reason, str(e)) from None
    if any(t["role"] == "assistant" and not t["content"].strip() for t in turns):
        raise Skip("empty_answer", "an assistant turn is empty")
    return record


def question_word(question: str) -> str:
    """MSVD-QA / MSRVTT-QA questions start with their type: what, who, how, when, where."""
    words = re.findall(r"[a-z]+", question.lower())
    return words[0] if words else "qa"


# ---------------------------------------------------------------- one converter per format

def from_llava_video(record, index, opts: Options) -> dict:
    """LLaVA-Video-178K (LLaVA JSON): {"id", "video", "conversations": [{"from", "value"}], "data_source"}."""
    turns = read_turns(record.get("conversations"))
    videos = path_list(record.get("video"), "video")
    images = path_list(record.get("image"), "image")
    if not videos and not images:
        raise Skip("missing_field", "no 'video' or 'image'")
    media = [("video", p) for p in videos] + [("image", p) for p in images]
    # Both kinds at once: marker order is unknown, so the text's own markers must already be right.
    return build(str(record.get("id", f"{opts.id_prefix}_{index}")), turns, media, opts,
                 source=record.get("data_source"), retag=not (videos and images))


def from_sharegpt4video(record, index, opts: Options) -> dict:
    """ShareGPT4Video: {"video_id", "video_path", "zip_folder", "captions": [{"idx", "content"}], ...};
    idx "-1" is the whole-video caption, "0", "1", ... the per-keyframe (differential) captions."""
    video_id = id_field(record, "video_id")
    captions = record.get("captions")
    if not isinstance(captions, list) or not all(isinstance(c, dict) for c in captions):
        raise Skip("missing_field", "missing 'captions'")
    whole = [c.get("content") for c in captions if str(c.get("idx")) == "-1"]
    if not whole or not isinstance(whole[0], str) or not whole[0].strip():
        raise Skip("no_caption", "no whole-video caption (idx -1)")
    turns = qa_turns(opts.caption_prompt, whole[0])
    if opts.keyframe_turn:
        try:
            frames = sorted((int(c.get("idx")), c.get("content")) for c in captions if str(c.get("idx")) != "-1")
        except (TypeError, ValueError):
            raise Skip("bad_field", "a keyframe caption has a non-numeric idx") from None
        texts = [text for _, text in frames if isinstance(text, str) and text.strip()]
        if texts:
            turns += qa_turns(KEYFRAME_PROMPT, "\n".join(f"{n}. {t.strip()}" for n, t in enumerate(texts, 1)))
    path = record.get("video_path")
    if not isinstance(path, str) or not path:
        path = opts.video_file(video_id, ".mp4")
    zip_folder = record.get("zip_folder")
    source = Path(zip_folder).stem if isinstance(zip_folder, str) and zip_folder else None
    return build(video_id, turns, [("video", path)], opts, category="caption", source=source)


def from_videoinstruct(record, index, opts: Options) -> dict:
    """VideoInstruct-100K (Video-ChatGPT): {"video_id": "v_...", "q", "a"}; videos are ActivityNet clips."""
    video_id = id_field(record, "video_id")
    turns = qa_turns(text_field(record, "q"), text_field(record, "a"))
    return build(f"{video_id}_{index}", turns, [("video", opts.video_file(video_id, ".mp4"))], opts)


def qa_record(prefix, record, index, stem, default_ext, opts: Options) -> dict:
    question, answer = text_field(record, "question"), text_field(record, "answer")
    category = question_word(question) if opts.category_from_question else "qa"
    record_id = f"{prefix}_{record['id']}" if isinstance(record.get("id"), (int, str)) else f"{prefix}_{index}"
    return build(record_id, qa_turns(question, answer), [("video", opts.video_file(stem, default_ext))],
                 opts, category=category)


def from_msrvtt_qa(record, index, opts: Options) -> dict:
    """MSRVTT-QA: {"question", "answer", "video_id": 7010, "id", "category_id"} → videos/video7010.mp4."""
    video_id = id_field(record, "video_id")
    stem = video_id if video_id.startswith("video") else f"video{video_id}"
    if not stem[5:].isdigit():
        raise Skip("bad_field", f"video_id {video_id!r} is not an MSR-VTT id")
    return qa_record("msrvtt", record, index, stem, ".mp4", opts)


def from_msvd_qa(record, index, opts: Options) -> dict:
    """MSVD-QA: {"question", "answer", "video_id": 1, "id"}; video N is "vidN" in youtube_mapping.txt,
    whose other column names the YouTubeClips .avi file. Without the mapping, files are named vidN."""
    video_id = id_field(record, "video_id")
    key = video_id if video_id.startswith("vid") else f"vid{video_id}"
    if not key[3:].isdigit():
        raise Skip("bad_field", f"video_id {video_id!r} is not an MSVD id")
    stem = key
    if opts.msvd_mapping is not None:
        if key not in opts.msvd_mapping:
            raise Skip("unknown_video_id", f"{key} is not in the mapping file")
        stem = opts.msvd_mapping[key]
    return qa_record("msvd", record, index, stem, ".avi", opts)


def from_minimind(record, index, opts: Options) -> dict:
    """MiniMind-V / Cinego: {"conversations": [{"role", "content"}], "image": "a.jpg" or "a.jpg, b.jpg"} (jsonl),
    or MiniMind-V's parquet rows {"conversations": a JSON string, "image_bytes": one image or a list}.
    Cinego puts a video path in "image"; each item's kind comes from its file suffix."""
    turns = read_turns(json_turns(record.get("conversations")))
    for turn in turns:
        if turn["role"] == "user":
            turn["content"] = EXPANDED_PLACEHOLDER.sub("<image>", turn["content"])
    record_id = str(record.get("id", f"{opts.id_prefix}_{index}"))
    if record.get("image_bytes") is not None:
        media = embedded_images(record["image_bytes"], turns, opts)
        # their paths are already relative to out_dir: media_root=out_dir keeps them as they are
        return build(record_id, turns, media, replace(opts, media_root=opts.out_dir), category=record.get("category"))
    value = record.get("image")
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else path_list(value, "image")
    media = []
    for name in names:
        suffix = Path(name).suffix.lower()
        if suffix not in VIDEO_SUFFIXES | IMAGE_SUFFIXES or not name:
            raise Skip("unknown_media_type", f"cannot tell whether {name!r} is an image or a video")
        media.append(("video" if suffix in VIDEO_SUFFIXES else "image", name))
    return build(record_id, turns, media, opts, category=record.get("category"))


def json_turns(conversations):
    """MiniMind-V's parquet holds the turns as a JSON string."""
    if not isinstance(conversations, str):
        return conversations
    try:
        return json.loads(conversations)
    except json.JSONDecodeError as e:
        raise Skip("bad_conversation", f"'conversations' is not valid JSON ({e.msg})") from None


def embedded_images(value, turns, opts: Options) -> list:
    """[("image", path relative to out_dir)] for a row's image bytes, each written once under opts.image_dir.
    A row whose text has no marker is a text-only turn: MiniMind-V fills its image column with a small black
    placeholder that its model never reads, so none is kept."""
    if not marker_kinds(turns):
        return []
    if opts.image_dir is None:
        raise ValueError("Options.image_dir is needed to write embedded images")
    try:
        paths = [save_image(data, opts.image_dir) for data in byte_list(value)]
    except BadImageBytes as e:
        raise Skip("bad_image", str(e)) from None
    return [("image", Path(os.path.relpath(p, opts.out_dir)).as_posix()) for p in paths]


# ---------------------------------------------------------------- temporal formats

# Grounding questions; one is picked per record from its id, so a run is repeatable and the model
# does not tie the task to one wording.
GROUNDING_QUESTIONS = (
    "When does this happen: {event}?",
    "At what time in the video does this happen: {event}?",
    "Find the moment in the video: {event}. When does it start and end?",
)
DENSE_CAPTION_PROMPT = "Describe what happens, with times."
OPTION_LETTERS = "ABCDE"
NEXTQA_COLUMNS = ("video", "question", "answer", "qid", "type", "a0", "a1", "a2", "a3", "a4")


def event_text(sentence) -> str:
    """A source sentence as a clause to put in a question: spaces and final full stops trimmed."""
    text = sentence.strip().rstrip(". ").strip() if isinstance(sentence, str) else ""
    if not text:
        raise Skip("missing_field", "an empty sentence")
    return text


def seconds(value, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise Skip("bad_span", f"{what}: {value!r} is not a number of seconds") from None
    if not math.isfinite(number):
        raise Skip("bad_span", f"{what}: {value!r} is not a number of seconds")
    return number


def span_numbers(start, end, what: str) -> tuple:
    """(start, end) as seconds, not before 0 and end not before start, or Skip("bad_span")."""
    start, end = seconds(start, what), seconds(end, what)
    if start < 0:
        raise Skip("bad_span", f"{what}: starts at {start} s, before the video")
    if end < start:
        raise Skip("bad_span", f"{what}: {start} to {end} ends before it starts")
    return start, end


def grounding_record(record_id, video, span, event, opts: Options, duration=None) -> dict:
    """User asks when `event` happens, the assistant answers format_span; "span" keeps the numbers for scoring."""
    question = GROUNDING_QUESTIONS[zlib.crc32(record_id.encode()) % len(GROUNDING_QUESTIONS)]
    turns = qa_turns(question.format(event=event), format_span(*span))
    record = build(record_id, turns, [("video", video)], opts, category="grounding")
    record["span"] = list(span)
    if duration is not None:
        record["duration"] = duration
    return record


def from_charades_sta(record, index, opts: Options) -> dict:
    """Charades-STA line: "VIDEO_ID START END##sentence" (seconds) → one grounding sample."""
    line = record["line"]
    head, sep, sentence = line.partition("##")
    fields = head.split()
    if not sep or len(fields) != 3:
        raise Skip("malformed_line", f"expected 'VIDEO_ID START END##sentence', got {line[:60]!r}")
    video_id = fields[0]
    span = span_numbers(fields[1], fields[2], video_id)
    return grounding_record(f"{video_id}_{index}", opts.video_file(video_id, ".mp4"), span,
                            event_text(sentence), opts)


def activitynet_events(record) -> list:
    """[(start, end), sentence] per event of an ActivityNet Captions video, spans clipped to [0, duration]."""
    duration, timestamps, sentences = record.get("duration"), record.get("timestamps"), record.get("sentences")
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
        raise Skip("bad_field", f"duration {duration!r} is not a positive number of seconds")
    if not isinstance(timestamps, list) or not isinstance(sentences, list) or not timestamps:
        raise Skip("missing_field", "missing 'timestamps' or 'sentences'")
    if len(timestamps) != len(sentences):
        raise Skip("count_mismatch", f"{len(timestamps)} timestamps for {len(sentences)} sentences")
    events = []
    for i, (stamp, sentence) in enumerate(zip(timestamps, sentences)):
        if not isinstance(stamp, list) or len(stamp) != 2:
            raise Skip("bad_span", f"timestamp {i} is not [start, end]")
        start, end = seconds(stamp[0], f"timestamp {i}"), seconds(stamp[1], f"timestamp {i}")
        if end < start:
            raise Skip("bad_span", f"timestamp {i}: {start} to {end} ends before it starts")
        # Annotated ends sometimes overrun the video (clipped); an event starting after the end is an error.
        if start >= duration:
            raise Skip("bad_span", f"timestamp {i} starts at {start} s, after the video's {duration} s")
        events.append(((max(0.0, start), min(end, duration)), sentence))
    return events


def from_activitynet_captions(record, index, opts: Options) -> list:
    """ActivityNet Captions: {"duration", "timestamps": [[start, end]], "sentences"} keyed by video id →
    one dense-caption sample (every event, in time order), then one grounding sample per event."""
    video_id = id_field(record, "video_id")
    events = activitynet_events(record)
    duration = record["duration"]
    video = opts.video_file(video_id, ".mp4")
    samples = [grounding_record(f"{video_id}_{i}", video, span, event_text(sentence), opts, duration)
               for i, (span, sentence) in enumerate(events)]
    in_order = sorted(events, key=lambda event: event[0])
    answer = "\n".join(f"{format_span(*span)}: {sentence.strip()}" for span, sentence in in_order)
    dense = build(f"{video_id}_dense", qa_turns(DENSE_CAPTION_PROMPT, answer), [("video", video)], opts,
                  category="dense_caption")
    dense["spans"] = [list(span) for span, _ in in_order]
    dense["duration"] = duration
    return [dense] + samples


def from_nextqa(record, index, opts: Options) -> dict:
    """NExT-QA csv row: video, question, a0..a4, answer (index of the right option), qid, type →
    a multiple-choice sample answered "(B) <option>"; "references" also accepts the letter or the text alone,
    and "choices" lists the five lettered options."""
    video_id, qid = id_field(record, "video"), id_field(record, "qid")
    question = text_field(record, "question").strip()
    options = [text_field(record, f"a{i}").strip() for i in range(len(OPTION_LETTERS))]
    answer = (record.get("answer") or "").strip()
    if answer not in {str(i) for i in range(len(OPTION_LETTERS))}:
        raise Skip("bad_field", f"answer {answer!r} is not an option index 0-{len(OPTION_LETTERS) - 1}")
    letter, right = OPTION_LETTERS[int(answer)], options[int(answer)]
    stem = video_id
    if opts.nextqa_mapping is not None:
        if video_id not in opts.nextqa_mapping:
            raise Skip("unknown_video_id", f"video {video_id} is not in the mapping file")
        stem = opts.nextqa_mapping[video_id]
    lettered = "\n".join(f"({l}) {o}" for l, o in zip(OPTION_LETTERS, options))
    question = question if question.endswith("?") else question + "?"   # the source writes none
    turns = qa_turns(f"{question}\n{lettered}", f"({letter}) {right}")
    category = (record.get("type") or "").strip() or "mc"
    sample = build(f"nextqa_{video_id}_{qid}", turns, [("video", opts.video_file(stem, ".mp4"))], opts,
                   category=category)
    sample["references"] = [letter, right]
    sample["choices"] = [f"({l}) {o}" for l, o in zip(OPTION_LETTERS, options)]   # eval.py also ranks these
    return sample

FORMATS = {
    "llava-video": from_llava_video,
    "sharegpt4video": from_sharegpt4video,
    "videoinstruct": from_videoinstruct,
    "msrvtt-qa": from_msrvtt_qa,
    "msvd-qa": from_msvd_qa,
    "minimind-v": from_minimind,
    "cinego": from_minimind,
    "charades-sta": from_charades_sta,
    "activitynet-captions": from_activitynet_captions,
    "nextqa": from_nextqa,
}
# Sources that are not a JSON list or jsonl of records; the rest are read by read_json_records.
READERS = {
    "charades-sta": read_text_lines,
    "activitynet-captions": read_json_by_video,
    "nextqa": lambda path: read_csv_rows(path, NEXTQA_COLUMNS),
}


def convert_records(fmt: str, source_path, opts: Options, counts: Counter, on_skip=None):
    """Yield our records for every convertible source record; count read/written/skip reasons.
    A converter returns one record, or a list when one source record gives several (ActivityNet).

    on_skip(where, record_id, Skip) is called for each skipped record (it may raise to stop)."""
    convert = FORMATS[fmt]
    opts = replace(opts, id_prefix=opts.id_prefix or Path(source_path).stem)
    for index, (where, record) in enumerate(read_source(source_path, fmt)):
        counts["read"] += 1
        try:
            if isinstance(record, str):
                raise Skip("malformed_json", record)
            out = convert(record, index, opts)
        except Skip as e:
            counts[e.reason] += 1
            if on_skip is not None:
                record_id = record.get("id", record.get("video_id")) if isinstance(record, dict) else None
                on_skip(where, record_id, e)
            continue
        out = out if isinstance(out, list) else [out]
        counts["written"] += len(out)
        yield from out
