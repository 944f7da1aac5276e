"""The train scripts end to end, as subprocesses with a tiny model: stages, logs, learning, feature
cache, resume, bad flags, bad samples, and 2-process DDP."""
import json

import pytest
from safetensors import safe_open

from conftest import read_log, run_python

LOG_KEYS = {"step", "loss", "lr", "tok_s", "skipped"}


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result


def first_lines(path, n):
    return path.read_text().splitlines()[:n]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_pretrain_then_image_then_video_sft_chain(tmp_path, synthetic, fresh_flags, weight_flags, train):
    out = tmp_path / "out"
    ok(train("train_pretrain.py", f"--data_path={synthetic / 'pretrain.jsonl'}", f"--out_dir={out}", *fresh_flags))
    ok(train("train_sft.py", "--stage=image", f"--data_path={synthetic / 'sft_image.jsonl'}", f"--out_dir={out}",
             "--from_weight=pretrain_vlm_32", *weight_flags))
    ok(train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}", f"--out_dir={out}",
             f"--from_weight={out / 'sft_image_32.safetensors'}", *weight_flags))
    for name, stage in [("pretrain_vlm_32", "pretrain"), ("sft_image_32", "image"), ("sft_video_32", "video")]:
        with safe_open(str(out / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["stage"] == stage and meta["step"] == "3"
        log = read_log(out / "logs" / f"{name}.jsonl")
        assert [r["step"] for r in log] == [1, 2, 3]
        assert all(LOG_KEYS <= set(r) for r in log)
        metrics = json.loads((out / "logs" / f"{name}.metrics.json").read_text())
        assert metrics["step"] == 3 and metrics["skipped"] == 0
    assert meta["source"].endswith("sft_image_32.safetensors")


def test_loss_falls_on_a_tiny_overfit_run(tmp_path, synthetic, fresh_flags, train):
    data = write_lines(tmp_path / "four.jsonl", first_lines(synthetic / "sft_video.jsonl", 4))
    out = tmp_path / "out"
    ok(train("train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}",
             f"--out_dir={out}", *fresh_flags, "--max_steps=30", "--learning_rate=1e-2", "--warmup_steps=2"))
    losses = [r["loss"] for r in read_log(out / "logs" / "sft_video_32.jsonl")]
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 1.0, losses


def test_extracted_feature_cache_is_used_and_matches_online_features(tmp_path, synthetic, vision_file,
                                                                      fresh_flags, train):
    cache = tmp_path / "features"
    data = synthetic / "sft_video.jsonl"
    ok(run_python("scripts/extract_features.py", f"--data={data}", "--clip_model=ViT-Tiny-16",
                  "--clip_image_size=32", f"--clip_pretrained={vision_file}", "--num_frames=4",
                  f"--out={cache}", "--num_workers=0"))
    assert (cache / "manifest.json").is_file()
    online = ok(train("train_sft.py", "--stage=video", f"--data_path={data}", f"--out_dir={tmp_path / 'a'}",
                      *fresh_flags, "--max_steps=1", "--feature_dir=none"))
    cached = ok(train("train_sft.py", "--stage=video", f"--data_path={data}", f"--out_dir={tmp_path / 'b'}",
                      *fresh_flags, "--max_steps=1", f"--feature_dir={cache}"))
    assert "not in the feature cache" in online.stderr
    assert "not in the feature cache" not in cached.stderr
    loss_online = read_log(tmp_path / "a" / "logs" / "sft_video_32.jsonl")[0]["loss"]
    loss_cached = read_log(tmp_path / "b" / "logs" / "sft_video_32.jsonl")[0]["loss"]
    # Same seed, same data, features equal up to fp16: the model init must not depend on whether
    # the CLIP tower was built in-process.
    assert abs(loss_online - loss_cached) < 1e-4, (loss_online, loss_cached)


def test_resume_continues_where_the_save_left_off(tmp_path, synthetic, fresh_flags, train):
    data = synthetic / "sft_video.jsonl"
    # A constant lr (no warmup, no decay), so the schedule does not depend on --max_steps.
    flags = ["--stage=video", f"--data_path={data}", *fresh_flags, "--warmup_steps=0", "--min_lr_ratio=1",
             "--learning_rate=1e-2"]
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'r'}", "--max_steps=4", "--save_every=2"))
    assert (tmp_path / "r" / "sft_video_32.resume.pt").is_file()
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'r'}", "--max_steps=7", "--resume"))
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'u'}", "--max_steps=7"))
    resumed = read_log(tmp_path / "r" / "logs" / "sft_video_32.jsonl")
    straight = read_log(tmp_path / "u" / "logs" / "sft_video_32.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    # Same batches (across the epoch boundary at step 6), same optimizer state → same losses.
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-5)


def test_resume_without_a_saved_state_is_a_clean_error(tmp_path, synthetic, fresh_flags, train):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={tmp_path}", *fresh_flags, "--resume")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "resume.pt" in result.stderr.strip().splitlines()[-1]


def test_flag_contradicting_the_checkpoint_is_one_error_line(synthetic, video_checkpoint, weight_flags, train,
                                                            tmp_path):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={tmp_path}", f"--from_weight={video_checkpoint}", *weight_flags,
                   "--hidden_size=64")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "hidden_size" in errors[0] and str(video_checkpoint) in errors[0]
    assert result.stderr.strip() == errors[0]


def bad_video_data(tmp_path, synthetic):
    bad = json.dumps({"id": "bad", "video": "videos/nope.mp4", "conversations": [
        {"role": "user", "content": "<video>\nhi"}, {"role": "assistant", "content": "x"}]})
    return write_lines(tmp_path / "bad.jsonl", first_lines(synthetic / "sft_video.jsonl", 3) + [bad])


def test_a_missing_video_is_skipped_and_counted(tmp_path, synthetic, fresh_flags, train):
    data = bad_video_data(tmp_path, synthetic)
    ok(train("train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}",
             f"--out_dir={tmp_path}", *fresh_flags, "--max_steps=1"))
    assert read_log(tmp_path / "logs" / "sft_video_32.jsonl")[0]["skipped"] == 1
    assert json.loads((tmp_path / "logs" / "sft_video_32.metrics.json").read_text())["skipped"] == 1


def test_strict_stops_at_a_missing_video_with_one_line_even_from_a_loader_worker(
        tmp_path, synthetic, video_checkpoint, weight_flags, train):
    data = bad_video_data(tmp_path, synthetic)
    # --from_weight: nothing reads the data before the DataLoader, so the error is raised inside
    # a worker process (--num_workers 2) and must still reach the user as one line.
    result = train("train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}",
                   f"--out_dir={tmp_path}", f"--from_weight={video_checkpoint}", *weight_flags,
                   "--max_steps=1", "--strict", "--num_workers=2")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nope.mp4" in last and str(data) in last


def test_two_process_ddp_matches_one_process_with_the_global_batch(tmp_path, synthetic, fresh_flags, train):
    flags = ["--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}", *fresh_flags, "--max_steps=2"]
    ddp = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
                     *flags, "--batch_size=2", f"--out_dir={tmp_path / 'ddp'}", timeout=300)
    ok(ddp)
    ok(train("train_sft.py", *flags, "--batch_size=4", f"--out_dir={tmp_path / 'single'}"))
    ddp_log = read_log(tmp_path / "ddp" / "logs" / "sft_video_32.jsonl")
    single_log = read_log(tmp_path / "single" / "logs" / "sft_video_32.jsonl")
    assert [r["step"] for r in ddp_log] == [1, 2]   # rank 0 writes, once per step
    # The loss is normalised by the global token count, so two halves of a batch give the same
    # loss and (after DDP's gradient average) the same update as the whole batch.
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (ddp_log, single_log)
    assert ddp.stdout.count("saved ") == 1
