"""The temporal suite through training: its feature cache keeps the sampled frames' times, 2-process DDP
equals one process step by step, a SIGKILLed run resumes bitwise, and a corpus of temporal records with
broken clocks or timing fields is skipped, counted and named (training, --strict, eval.py), all with a
model that reads absolute seconds (--summary temporal --time_encoding seconds), fps frame sampling and a
token budget that grows with duration (--segment_seconds).

Helpers and fixtures come from conftest.py and the tests they were written for (test_train.py,
test_resume.py, test_bad_data.py)."""
import json
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dataset.synthetic_temporal as st
import eval as eval_script
from conftest import CLIP_MODEL, CLIP_SIZE, read_log, run_python
from dataset.features import FeatureCache, FeatureWriter
from dataset.vlm_dataset import ConversationDataset
from model.chat import ChatEncoder
from model.checkpoint import read_metadata, save_checkpoint
from model.config import LMConfig, VisionConfig
from model.vlm import VideoLLM
from test_bad_data import run_main, train as train_in_process
from test_resume import kill_at_step, launch, logged_steps, visible_files_are_whole
from test_train import first_lines, ok, write_lines

SEED, N_VIDEOS, N_TEST = 0, 6, 3
SETTINGS = dict(fps=4, size=32, min_seconds=4, max_seconds=8, test_max_seconds=8)
SAMPLE_FPS, CAP = 1.0, 8   # 1 frame a second, at most 8: the 4-8 s clips give 5-9 frames (9: spread evenly)
# The model reads each frame's time in seconds; frames are sampled by the clock (later flags win, argparse).
SAMPLING = ["--frame_sampling=fps", f"--sample_fps={SAMPLE_FPS:g}", f"--num_frames={CAP}"]
SECONDS = ["--summary=temporal", "--time_encoding=seconds", *SAMPLING,
           "--segment_seconds=2", "--num_visual_tokens=8"]   # 2-8 visual tokens per clip
NAME = "sft_video_32"
N_TRAIN = 7   # records of sft_video.jsonl trained on: 7 over 2 ranks × batch 2 leaves rank 1 a padding slot


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """A tiny temporal suite: 6 training videos (pair members on top), 3 test ones, 4-8 s at 4 fps, 32 px."""
    root = tmp_path_factory.mktemp("temporal")
    st.generate(root, N_VIDEOS, N_TEST, SEED, st.Settings(**SETTINGS, codec=st.pick_codec()), workers=2)
    assert len((root / "sft_video.jsonl").read_text().splitlines()) >= N_TRAIN
    return root


@pytest.fixture(scope="module")
def temporal_cache(suite, frame_encoder) -> Path:
    """The feature cache of the suite's training and test videos, sampled at 1 fps (cap 8), with their times."""
    from extract_features import collect_media, extract
    folder = suite / "features" / "tiny-fps1"
    done, _, failed = extract(collect_media([suite / "sft_video.jsonl", suite / "test.jsonl"]), suite, frame_encoder,
                              FeatureWriter(folder), fps=SAMPLE_FPS, num_frames=CAP, num_workers=0)
    assert done == len(list((suite / "videos").glob("*.mp4"))) and failed == 0
    return folder


@pytest.fixture(scope="module")
def seconds_checkpoint(tmp_path_factory, tokenizer, tokenizer_dir, vocab_size, vision_file, frame_encoder) -> Path:
    """An (untrained) seconds model with fps sampling as a checkpoint eval.py loads: eval needs no learning."""
    torch.manual_seed(0)
    lm = LMConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                  intermediate_size=64)
    vis = VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(vision_file),
                       clip_dim=frame_encoder.dim, num_frames=CAP, frame_sampling="fps", sample_fps=SAMPLE_FPS,
                       summary="temporal", time_encoding="seconds", num_visual_tokens=8, segment_seconds=2.0, summary_dim=16,
                       summary_layers=1, summary_heads=2,
                       vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    path = tmp_path_factory.mktemp("seconds_model") / f"{NAME}.safetensors"
    save_checkpoint(VideoLLM(lm, vis), path, stage="video", step=0, tokenizer=str(tokenizer_dir))
    return path


def records(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def jsonl(path, rows) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows])


def vision_meta(checkpoint) -> dict:
    return json.loads(read_metadata(checkpoint)["vision_config"])


def test_the_cache_keeps_each_clips_sampled_frame_times_and_its_duration(suite, temporal_cache):
    cache = FeatureCache(temporal_cache)
    assert cache.has_times()
    durations = {r["video"]: r["duration"] for split in ("sft_video", "test")
                 for r in records(suite / f"{split}.jsonl")}
    assert set(cache.index) == set(durations)
    for key, duration in durations.items():
        times, cached_duration = cache.get_times(key)
        assert cache.get(key).shape[0] == len(times) == min(CAP, np.ceil(duration * SAMPLE_FPS))
        assert cached_duration == pytest.approx(duration)   # the container's clock, as the generator wrote it
        times = times.numpy()
        assert (np.diff(times) > 0).all() and 0 <= times[0] and times[-1] < duration   # each frame once
        if np.ceil(duration * SAMPLE_FPS) <= CAP:   # sampled at 1 fps: frames shown at whole seconds, all of them
            assert times.tolist() == list(range(int(np.ceil(duration))))
        else:                                        # more than the cap: spread evenly, at frame centres
            assert times[-1] > duration - 1


def test_two_process_ddp_on_temporal_data_matches_one_process_step_by_step(tmp_path, suite, temporal_cache,
                                                                           fresh_flags, train):
    data = write_lines(tmp_path / "train.jsonl", first_lines(suite / "sft_video.jsonl", N_TRAIN))
    val = write_lines(tmp_path / "val.jsonl", first_lines(suite / "test.jsonl", 4))
    # 2 micro-batches an epoch, 2 per step: every step is an epoch (reshuffled), its last micro-batch uneven.
    flags = ["--stage=video", f"--data_path={data}", f"--media_root={suite}", f"--val_path={val}", *fresh_flags,
             *SECONDS, f"--feature_dir={temporal_cache}", "--max_steps=3", "--accumulation_steps=2",
             "--learning_rate=1e-2", "--warmup_steps=0"]
    ddp = ok(run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
                        *flags, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}", timeout=300))
    single = ok(train("train_sft.py", *flags, "--batch_size=4", f"--out_dir={tmp_path / 'single'}"))
    for run in (ddp, single):   # the cache has the times this model reads: nothing is encoded online
        assert "CLIP runs online" not in run.stderr and "warning: skipped" not in run.stderr, run.stderr[-2000:]
    ddp_log = read_log(tmp_path / "ddp" / "logs" / f"{NAME}.jsonl")
    single_log = read_log(tmp_path / "single" / "logs" / f"{NAME}.jsonl")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == [1, 2, 3]
    assert [r["epoch"] for r in ddp_log] == [r["epoch"] for r in single_log] == [0, 1, 2]
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (ddp_log, single_log)
    assert ddp_log[0]["loss"] != ddp_log[-1]["loss"]   # it learns: the steps are not one repeated number
    metrics = [json.loads((tmp_path / run / "logs" / f"{NAME}.metrics.json").read_text()) for run in ("ddp", "single")]
    assert metrics[0]["skipped"] == metrics[1]["skipped"] == 0
    assert abs(metrics[0]["val_loss"] - metrics[1]["val_loss"]) <= 1e-5
    ddp_weights = load_file(str(tmp_path / "ddp" / f"{NAME}.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / f"{NAME}.safetensors"))
    assert ddp_weights.keys() == single_weights.keys()
    assert max(float((ddp_weights[k] - single_weights[k]).abs().max()) for k in ddp_weights) <= 1e-4
    meta = vision_meta(tmp_path / "ddp" / f"{NAME}.safetensors")
    assert (meta["time_encoding"], meta["frame_sampling"], meta["sample_fps"], meta["num_frames"]) == \
        ("seconds", "fps", SAMPLE_FPS, CAP)


def test_a_temporal_run_killed_after_a_save_resumes_bitwise(tmp_path, suite, fresh_flags):
    """Online CLIP (no cache): each clip is decoded in a loader worker, sampled by its container's clock."""
    steps = 10
    data = write_lines(tmp_path / "train.jsonl", first_lines(suite / "sft_video.jsonl", N_TRAIN))

    def flags(out):   # 2 steps an epoch: 4 reshuffles; dropout and the worker's seed draw from the RNGs
        return ["train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={suite}", *fresh_flags,
                *SECONDS, "--feature_dir=none", f"--max_steps={steps}", "--save_every=1", "--dropout=0.1",
                "--num_workers=1", "--learning_rate=1e-2", "--warmup_steps=2", f"--out_dir={out}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = launch(flags(straight))
    log = killed / "logs" / f"{NAME}.jsonl"
    rng = random.Random(7)
    proc = launch(flags(killed))
    assert kill_at_step(proc, log, rng.randint(3, 6), rng) == -signal.SIGKILL
    at_kill = logged_steps(log)
    assert 3 <= at_kill < steps and (killed / f"{NAME}.resume.pt").is_file()   # killed after a save, before the end
    visible_files_are_whole(killed)
    resumed = launch(flags(killed) + ["--resume"])
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    _, err = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err[-3000:]
    assert "CLIP runs online" in err and "warning: skipped" not in err   # every clip had a usable clock
    resumed_log, straight_log = read_log(log), read_log(straight / "logs" / f"{NAME}.jsonl")
    assert [r["step"] for r in resumed_log] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    a, b = load_file(str(killed / f"{NAME}.safetensors")), load_file(str(straight / f"{NAME}.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), at_kill
    assert vision_meta(killed / f"{NAME}.safetensors")["time_encoding"] == "seconds"


# ---------------------------------------------------------------- bad temporal data

def honest(times, fps):
    return times, fps


# file name: (what decord reports for it, given its honest (times (n, 2), average fps)).
CLOCKS = {
    "noclock.mp4": lambda times, fps: (np.zeros_like(times), 0.0),   # no stored times, no frame rate
    "backwards.mp4": lambda times, fps: (times[::-1].copy(), fps),
    "nan_times.mp4": lambda times, fps: (np.where(np.arange(len(times))[:, None] == 1, np.nan, times), fps),
    "rate_only.mp4": lambda times, fps: (np.zeros_like(times), fps),   # no stored times, but a frame rate: usable
}
# name: (video file, what its warning says after the file's path) — each skipped by a seconds model.
BAD_CLOCKS = {
    "no clock": ("noclock.mp4", "frame times unknown (no stored timestamps, no frame rate)"),
    "times go backwards": ("backwards.mp4", "frame times go backwards at frame 1"),
    "times not numbers": ("nan_times.mp4", "frame times are not all numbers"),
}
# name: record fields — fields training ignores (docs/data-format.md: "eval only"), eval refuses.
BAD_FIELDS = {
    "span ends before it starts": ({"category": "grounding", "span": [5.0, 2.0]},
                                   '"span" must be [start, end] in seconds with end >= start, not [5.0, 2.0]'),
    "negative duration": ({"duration": -3.0}, '"duration" must be a number of seconds >= 0, not -3.0'),
}


def fake_clocks(monkeypatch):
    """decord reports the CLOCKS times and frame rates for those files (in this process and forked workers)."""
    import decord
    real_init = decord.VideoReader.__init__
    real_times, real_fps = decord.VideoReader.get_frame_timestamp, decord.VideoReader.get_avg_fps
    opened = {}

    def remember(self, path, *args, **kw):
        opened[id(self)] = Path(str(path)).name
        real_init(self, path, *args, **kw)

    def clock(self, idx):
        fake = CLOCKS.get(opened.get(id(self)), honest)
        return fake(np.asarray(real_times(self, idx)), real_fps(self))

    monkeypatch.setattr(decord.VideoReader, "__init__", remember)
    monkeypatch.setattr(decord.VideoReader, "get_frame_timestamp", lambda self, idx: clock(self, idx)[0])
    monkeypatch.setattr(decord.VideoReader, "get_avg_fps", lambda self: clock(self, [0])[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, suite):
    """The suite's training records, then one per CLOCKS file (copies of a good clip) and per BAD_FIELDS."""
    root = tmp_path_factory.mktemp("temporal_bad")
    shutil.copytree(suite / "videos", root / "videos")
    good = records(suite / "sft_video.jsonl")[:4]
    template = good[0]
    rows, lines = list(good), {}
    for name in CLOCKS:
        shutil.copy(suite / template["video"], root / "videos" / name)
        rows.append({**template, "id": name, "video": f"videos/{name}"})
        lines[name] = len(rows)
    for name, (fields, _) in BAD_FIELDS.items():
        rows.append({**template, "id": name, **fields})
        lines[name] = len(rows)
    data = jsonl(root / "train.jsonl", rows)
    val = write_lines(root / "val.jsonl", first_lines(suite / "test.jsonl", 3))
    return root, data, val, lines


def bad_data_flags(corpus, fresh_flags, temporal_cache, out):
    root, data, val, _ = corpus
    # The good clips come from the cache; the CLOCKS copies are not in it, so they are decoded here.
    return [f"--data_path={data}", f"--val_path={val}", f"--media_root={root}", *fresh_flags, *SECONDS,
            f"--feature_dir={temporal_cache}", "--max_steps=0", "--epochs=1", f"--out_dir={out}"]


def test_a_seconds_model_skips_counts_and_names_each_video_without_a_usable_clock(
        corpus, fresh_flags, temporal_cache, tmp_path, monkeypatch, capsys):
    """One warning per clip without a usable clock; a clip with only a frame rate trains (at that rate), and so
    do the records with a bad span or duration: training ignores those fields (docs/data-format.md)."""
    root, data, _, lines = corpus
    fake_clocks(monkeypatch)
    code, out, err = train_in_process(monkeypatch, capsys, *bad_data_flags(corpus, fresh_flags, temporal_cache,
                                                                           tmp_path))
    assert code == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    for name, (video, says) in BAD_CLOCKS.items():
        named = [w for w in warnings if w.startswith(f"warning: skipped {data}:{lines[video]}: ")]
        assert len(named) == 1, (name, warnings)
        assert named[0].startswith(f"warning: skipped {data}:{lines[video]}: {root / 'videos' / video}: {says}"), \
            (name, named)
    assert len(warnings) == len(BAD_CLOCKS), warnings   # a clip with only a frame rate, and the timing fields, train
    metrics = json.loads((tmp_path / "logs" / f"{NAME}.metrics.json").read_text())
    assert metrics["skipped"] == len(BAD_CLOCKS) and metrics["step"] >= 1
    assert read_log(tmp_path / "logs" / f"{NAME}.jsonl")[-1]["skipped"] == len(BAD_CLOCKS)


def test_an_index_model_trains_on_the_same_clocks_without_a_skip(corpus, fresh_flags, temporal_cache, tmp_path,
                                                                 monkeypatch, capsys):
    """A clock is required only where it is read: uniform sampling, index times and a fixed token budget
    use every clip."""
    fake_clocks(monkeypatch)
    flags = bad_data_flags(corpus, fresh_flags, temporal_cache, tmp_path)
    code, out, err = train_in_process(monkeypatch, capsys, *flags, "--time_encoding=index", "--frame_sampling=uniform",
                                      "--sample_fps=0", "--segment_seconds=0", "--feature_dir=none")
    assert code == 0, err
    assert "warning: skipped" not in err, err
    assert json.loads((tmp_path / "logs" / f"{NAME}.metrics.json").read_text())["skipped"] == 0


def test_strict_stops_a_seconds_model_at_the_first_clip_without_a_clock_with_one_line(
        corpus, fresh_flags, temporal_cache, tmp_path, monkeypatch, capsys):
    root, data, _, lines = corpus
    fake_clocks(monkeypatch)
    code, out, err = train_in_process(monkeypatch, capsys, *bad_data_flags(corpus, fresh_flags, temporal_cache,
                                                                           tmp_path), "--strict")
    assert code == 1 and "Traceback" not in err and "warning: skipped" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"error: {data}:"), err
    line = int(errors[0].split(":")[2])
    video = next(v for v, _ in BAD_CLOCKS.values() if lines[v] == line)   # one of the clock problems, named
    assert f"{data}:{line}: {root / 'videos' / video}: " in errors[0]
    assert not (tmp_path / f"{NAME}.safetensors").exists()


def test_a_seconds_model_does_not_read_a_cache_where_some_times_are_missing(
        suite, temporal_cache, fresh_flags, tokenizer, tmp_path, monkeypatch, capsys):
    """A cache entry without times (written before they were kept): the dataset refuses it for a seconds model,
    and training does not use such a cache at all (one note naming it), so CLIP encodes every clip online."""
    cache, untimed = FeatureCache(temporal_cache), "videos/v00000.mp4"
    writer = FeatureWriter(tmp_path / "cache")
    for key in cache.index:
        writer.add(key, cache.get(key), *(() if key == untimed else cache.get_times(key)))
    writer.flush()
    partial = FeatureCache(tmp_path / "cache")
    assert partial.timed_keys() == set(cache.index) - {untimed} and not partial.has_times()

    data = write_lines(tmp_path / "train.jsonl", first_lines(suite / "sft_video.jsonl", 4))
    dataset = ConversationDataset(data, ChatEncoder(tokenizer, 2), CAP, 512, media_root=suite, cache=partial,
                                  fps=SAMPLE_FPS, need_times=True)
    items = [dataset[i] for i in range(len(dataset))]
    untimed_rows = [i for i, r in enumerate(records(data)) if r["video"] == untimed]
    assert untimed_rows
    for i, item in enumerate(items):
        if i in untimed_rows:
            assert item == {"error": f"{data}:{i + 1}: {untimed}: cached without frame times, which this model reads"}
        else:
            assert torch.equal(item["media"][0].times, cache.get_times(records(data)[i]["video"])[0])

    code, out, err = train_in_process(monkeypatch, capsys, f"--data_path={data}", f"--media_root={suite}",
                                      f"--val_path={data}", *fresh_flags, *SECONDS,
                                      f"--feature_dir={tmp_path / 'cache'}", "--max_steps=1",
                                      f"--out_dir={tmp_path / 'out'}")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: {tmp_path / 'cache'}: features cached without frame times")
    assert "CLIP runs online" in err and "warning: skipped" not in err
    assert json.loads((tmp_path / "out" / "logs" / f"{NAME}.metrics.json").read_text())["skipped"] == 0


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, suite):
    """Test records of cached clips, then one per BAD_FIELDS (a test record with that field broken)."""
    folder = tmp_path_factory.mktemp("temporal_eval")
    rows = records(suite / "test.jsonl")
    grounded = next(r for r in rows if r.get("span"))
    good = rows[:4]
    bad = [{**grounded, "id": name, **fields} for name, (fields, _) in BAD_FIELDS.items()]
    lines = {name: len(good) + 1 + i for i, name in enumerate(BAD_FIELDS)}
    return jsonl(folder / "test.jsonl", good + bad), len(good), lines


def test_eval_skips_counts_and_names_each_record_with_a_bad_span_or_duration(
        suite, eval_data, seconds_checkpoint, temporal_cache, tmp_path, monkeypatch, capsys):
    data, n_good, lines = eval_data
    argv = ["eval.py", f"--weight={seconds_checkpoint}", f"--data_path={data}", f"--media_root={suite}",
            f"--feature_dir={temporal_cache}", "--max_new_tokens=4", f"--metrics_out={tmp_path / 'm.json'}",
            f"--out={tmp_path / 'preds.jsonl'}"]
    code, out, err = run_main(eval_script.main, monkeypatch, capsys, argv)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert warnings == [f"warning: skipped {data}:{lines[name]}: {says}" for name, (_, says) in BAD_FIELDS.items()]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["skipped"] == len(BAD_FIELDS) and metrics["n"] == n_good
    preds = records(tmp_path / "preds.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in records(data)[:n_good]]
    assert all(p["duration"] >= 0 for p in preds)   # the durations the scores are bucketed by are the good ones

    code, out, err = run_main(eval_script.main, monkeypatch, capsys, argv + ["--strict"])
    first = min(lines.values())   # batch mode keeps file order: the bad span
    assert code == 1 and "Traceback" not in err
    assert err == f"error: {data}:{first}: {BAD_FIELDS['span ends before it starts'][1]}\n"


def test_eval_on_a_file_holding_only_a_bad_span_answers_nothing_and_says_why(
        suite, eval_data, seconds_checkpoint, temporal_cache, tmp_path, monkeypatch, capsys):
    data, n_good, lines = eval_data
    line = records(data)[lines["span ends before it starts"] - 1]
    one = jsonl(tmp_path / "one.jsonl", [line])
    argv = ["eval.py", f"--weight={seconds_checkpoint}", f"--data_path={one}", f"--media_root={suite}",
            f"--feature_dir={temporal_cache}", "--max_new_tokens=4", f"--metrics_out={tmp_path / 'm.json'}"]
    code, out, err = run_main(eval_script.main, monkeypatch, capsys, argv)
    assert code == 0 and err == f"warning: skipped {one}:1: {BAD_FIELDS['span ends before it starts'][1]}\n"
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n"] == 0 and metrics["skipped"] == 1 and metrics["grounding"] is None
    code, out, err = run_main(eval_script.main, monkeypatch, capsys, argv + ["--strict"])
    assert code == 1 and err == f"error: {one}:1: {BAD_FIELDS['span ends before it starts'][1]}\n"


@pytest.mark.parametrize("name", list(BAD_CLOCKS))
def test_eval_of_a_seconds_model_on_a_clip_without_a_usable_clock_exits_1_with_one_line(
        corpus, seconds_checkpoint, name, monkeypatch, capsys):
    root = corpus[0]
    video, says = BAD_CLOCKS[name]
    fake_clocks(monkeypatch)
    code, out, err = run_main(eval_script.main, monkeypatch, capsys,
                              ["eval.py", f"--weight={seconds_checkpoint}", f"--video={root / 'videos' / video}",
                               "--prompt=When does it move?", "--max_new_tokens=2"])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {root / 'videos' / video}: {says}"), err


def test_eval_batch_mode_skips_and_counts_the_whole_temporal_corpus(corpus, seconds_checkpoint, temporal_cache,
                                                                    tmp_path, monkeypatch, capfd):
    """Clips without a clock and bad timing fields, in one file. The clips not in the cache are decoded in
    the loader's (forked) workers, which print the warnings: capfd, not capsys, sees them."""
    root, data, _, lines = corpus
    fake_clocks(monkeypatch)
    code, out, err = run_main(eval_script.main, monkeypatch, capfd,
                              ["eval.py", f"--weight={seconds_checkpoint}", f"--data_path={data}",
                               f"--feature_dir={temporal_cache}", "--max_new_tokens=2",
                               f"--metrics_out={tmp_path / 'm.json'}"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    expected = [f"{data}:{lines[video]}: {root / 'videos' / video}: {says}" for video, says in BAD_CLOCKS.values()]
    expected += [f"{data}:{lines[name]}: {says}" for name, (_, says) in BAD_FIELDS.items()]
    assert len(warnings) == len(expected)
    for line in expected:
        assert [w for w in warnings if w.startswith(f"warning: skipped {line}")], (line, warnings)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["skipped"] == len(expected) and metrics["n"] == len(records(data)) - len(expected)


@pytest.mark.parametrize("last_end", [float("nan"), 0.0])
def test_a_required_clock_is_refused_wherever_its_bad_times_are(last_end):
    from dataset.media import MediaError, frame_times

    class Reader:   # decord's two clock calls, for a 4 fps clip of 8 frames whose stored times go wrong
        def get_frame_timestamp(self, idx):
            starts = np.arange(8) / 4
            times = np.stack([starts, starts + 0.25], axis=1)
            times[3, 0] = 5.0          # backwards after frame 3
            times[-1, 1] = last_end    # and the last frame's end is not a positive number
            return times

        def get_avg_fps(self):
            return 4.0
    with pytest.raises(MediaError):
        frame_times(Reader(), 8, "clip.mp4", required=True)


# ---------------------------------------------------------------- time as text before each segment's tokens


def test_time_text_spells_each_segments_start_second_before_its_pair_alike_in_training_and_in_the_engine(
        tmp_path, suite, temporal_cache, tokenizer, tokenizer_dir, vocab_size, vision_file, frame_encoder):
    from model.engine import Engine
    from model.video_summary import media_slot_counts
    from functools import partial
    lm = LMConfig(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    vis = VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(vision_file),
                       clip_dim=frame_encoder.dim, num_frames=CAP, frame_sampling="fps", sample_fps=SAMPLE_FPS,
                       summary="temporal", time_encoding="seconds", num_visual_tokens=8, segment_seconds=2.0,
                       timestamp_text=True, summary_dim=16, summary_layers=1, summary_heads=2,
                       vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    path = tmp_path / "stamped.safetensors"
    save_checkpoint(VideoLLM(lm, vis), path, stage="video", step=0, tokenizer=str(tokenizer_dir))
    chat = ChatEncoder(tokenizer, vis.num_visual_tokens)
    data = ConversationDataset(suite / "test.jsonl", chat, CAP, 2048, cache=FeatureCache(temporal_cache),
                               for_generation=True, fps=SAMPLE_FPS, need_times=True,
                               slot_counts=partial(media_slot_counts, vis))
    item, record = data[0], records(suite / "test.jsonl")[0]
    ids = item["input_ids"].tolist()
    # Frames a second apart from t0, 2-s segments (at most 4): the k-th pair of slots follows the whole
    # second its segment starts in, " <int(t0 + 2k)>"
    times = item["media"][0].times.tolist()
    t0, segments = times[0], min(4, (len(times) + 1) // 2)
    first = ids.index(chat.vision_pad) - len(chat.text(f" {int(t0)}"))
    stamped = []
    for k in range(segments):
        stamped += chat.text(f" {int(t0 + 2 * k)}") + [chat.vision_pad] * 2
    assert ids[first:first + len(stamped)] == stamped and ids.count(chat.vision_pad) == 2 * segments
    # eval.py, the web chat and the server read the same layout through the engine
    engine = Engine.load(str(path), tokenizer=str(tokenizer_dir))
    assert engine.prompt_ids(record["conversations"][:-1], item["media"]) == ids


def test_time_text_without_time_segments_is_refused_in_one_line():
    from model.video_summary import build_summary
    with pytest.raises(ValueError, match="needs segment_seconds"):
        build_summary(VisionConfig(timestamp_text=True))


@pytest.mark.parametrize("flags, says", [(["--timestamp_text"], "needs segment_seconds"),
                                         (["--clip_regions=-1"], "clip_regions must be 0..8")])
def test_summary_settings_no_model_can_take_stop_training_with_one_line_not_a_traceback(suite, flags, says):
    from trainer.config import resolve_configs
    from trainer.cli import build_parser
    from trainer.errors import TrainingError
    args = build_parser("pretrain", 1e-3, 1, 2).parse_args(["--data_path", str(suite / "pretrain.jsonl"), *flags])
    with pytest.raises(TrainingError, match=says) as error:
        resolve_configs(args)
    assert "\n" not in str(error.value)


def test_a_region_model_trains_caches_and_answers_on_features_as_wide_as_its_regions_make_them(
        suite, fresh_flags, frame_encoder, vision_file, tmp_path, monkeypatch, capsys):
    """--clip_regions 2: the cache gets a folder of its own, the checkpoint keeps the setting, and a raw video
    at chat time is encoded the same way (the 5-vector features reach the summary, no shape error)."""
    extract = run_python("scripts/extract_features.py", "--data", suite / "sft_video.jsonl",
                         f"--clip_model={CLIP_MODEL}", f"--clip_image_size={CLIP_SIZE}",
                         f"--clip_pretrained={vision_file}",
                         "--clip_regions=2", *SAMPLING, "--num_workers=0")
    ok(extract)
    region_folders = [p for p in (suite / "features").iterdir() if "-r2-" in p.name]
    assert len(region_folders) == 1
    ok(run_python("train_sft.py", "--stage=video", f"--data_path={suite / 'sft_video.jsonl'}", *fresh_flags, *SECONDS,
                  "--clip_regions=2", f"--out_dir={tmp_path}", "--save_name=regions"))
    meta = vision_meta(tmp_path / "regions.safetensors")
    assert meta["clip_regions"] == 2 and meta["clip_dim"] == 5 * frame_encoder.dim
    assert FeatureCache(region_folders[0]).get(records(suite / "sft_video.jsonl")[0]["video"]).shape[-1] == \
        meta["clip_dim"]
    video = suite / records(suite / "test.jsonl")[0]["video"]
    code, out, err = run_main(eval_script.main, monkeypatch, capsys,
                              ["eval.py", f"--weight={tmp_path / 'regions.safetensors'}", f"--video={video}",
                               "--prompt=When does it move?", "--max_new_tokens=2"])
    assert code == 0 and "Traceback" not in err, err


def test_a_records_time_offset_moves_its_frames_onto_the_clock_of_its_text_and_a_bad_one_is_named(
        suite, temporal_cache, tokenizer, tmp_path):
    """A window of a longer recording ("time_offset": 30): every frame time, cached or decoded, is 30 s later;
    a malformed offset is one line naming the record, and the record is skipped."""
    cache, good = FeatureCache(temporal_cache), records(suite / "sft_video.jsonl")[0]
    bad = {"negative": -1.0, "text": "30", "not finite": float("inf"), "a bool": True}
    data = jsonl(tmp_path / "train.jsonl", [good, {**good, "time_offset": 30}]
                 + [{**good, "time_offset": v} for v in bad.values()])
    chat = ChatEncoder(tokenizer, 2)
    cached, decoded = (ConversationDataset(data, chat, CAP, 512, media_root=suite, cache=c, fps=SAMPLE_FPS,
                                           need_times=True, preprocess=p)
                       for c, p in ((cache, None), (None, lambda pixels: torch.zeros(len(pixels), 3, 2, 2))))
    times = cache.get_times(good["video"])[0]
    for dataset in (cached, decoded):
        plain, windowed = dataset[0]["media"][0].times, dataset[1]["media"][0].times
        assert torch.allclose(plain, times, atol=1e-3) and torch.allclose(windowed, plain + 30)
    for i, value in enumerate(bad.values(), start=3):
        assert cached[i - 1] == {"error": f'{data}:{i}: "time_offset" must be a number of seconds >= 0, not {json.dumps(value)}'}
