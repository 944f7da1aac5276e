"""The train scripts end to end, as subprocesses with a tiny model: stages, logs, learning, feature
cache, bitwise resume, bad flags, --strict from a loader worker, 2-process DDP against one process,
and the sampler that splits epochs over ranks. (Bad-data corpus: test_bad_data.py; kills: test_resume.py.)"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import read_log, run_python
from model.checkpoint import read_metadata
from trainer.sampler import PAD, ShardSampler

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


def test_resume_continues_bitwise_where_the_save_left_off_with_fp16_loss_scaling(tmp_path, synthetic, fresh_flags,
                                                                                 train):
    data = synthetic / "sft_video.jsonl"
    # A constant lr (no warmup, no decay), so the schedule does not depend on --max_steps. fp16
    # autocast brings a loss scaler whose state must resume too; dropout draws from the RNG, and
    # two loader workers draw their seeds from the loader's generator.
    flags = ["--stage=video", f"--data_path={data}", *fresh_flags, "--warmup_steps=0", "--min_lr_ratio=1",
             "--learning_rate=1e-2", "--dtype=fp16", "--dropout=0.1", "--num_workers=2"]
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'r'}", "--max_steps=4", "--save_every=2"))
    assert (tmp_path / "r" / "sft_video_32.resume.pt").is_file()
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'r'}", "--max_steps=7", "--resume"))
    ok(train("train_sft.py", *flags, f"--out_dir={tmp_path / 'u'}", "--max_steps=7"))
    resumed = read_log(tmp_path / "r" / "logs" / "sft_video_32.jsonl")
    straight = read_log(tmp_path / "u" / "logs" / "sft_video_32.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 8))
    # Same batches (across the epoch boundary at step 6), same optimizer, scaler and RNG state.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    # The scaler counts its overflow-free steps since the start (7); one restarted at resume would say 3.
    scalers = [torch.load(tmp_path / run / "sft_video_32.resume.pt", weights_only=True)["scaler"] for run in "ru"]
    assert scalers[0] == scalers[1] and scalers[0]["_growth_tracker"] == 7
    a = load_file(str(tmp_path / "r" / "sft_video_32.safetensors"))
    b = load_file(str(tmp_path / "u" / "sft_video_32.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


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


def missing_video_line(name):
    return json.dumps({"id": name, "video": f"videos/{name}.mp4", "conversations": [
        {"role": "user", "content": "<video>\nhi"}, {"role": "assistant", "content": "x"}]})


def test_two_process_ddp_matches_one_process_step_by_step(tmp_path, synthetic, mixed_lengths, fresh_flags, train):
    # 9 samples over 2 ranks × batch 2: each epoch ends in an uneven batch (one rank gets a padding
    # slot, not a repeated sample). The 2 bad samples are exactly rank 1's first micro-batch of
    # epoch 0, so that rank has nothing to learn from while rank 0 has: it must still take part
    # in DDP's gradient exchange, and the skip count must include its samples.
    n = 9
    rank1_first = ShardSampler(n, world=2, rank=1, seed=0).share()[:2]
    # Long conversations and short captions: each rank packs its micro-batch (the default), in other rows
    # than the single process packs the whole batch into.
    lines = mixed_lengths.read_text().splitlines()
    good, bad = iter(lines[:4] + lines[-3:]), iter(["nope0", "nope1"])
    data = write_lines(tmp_path / "train.jsonl",
                       [missing_video_line(next(bad)) if i in rank1_first else next(good) for i in range(n)])
    val = write_lines(tmp_path / "val.jsonl", (synthetic / "sft_video.jsonl").read_text().splitlines()[7:11])
    # 3 micro-batches an epoch, 2 per step: step 2 spans the epoch boundary (reshuffle).
    flags = ["--stage=video", f"--data_path={data}", f"--media_root={synthetic}", f"--val_path={val}", *fresh_flags,
             "--max_steps=3", "--accumulation_steps=2", "--learning_rate=1e-2", "--warmup_steps=0"]
    ddp = ok(run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py",
                        *flags, "--batch_size=2", "--grad_checkpointing", f"--out_dir={tmp_path / 'ddp'}", timeout=300))
    ok(train("train_sft.py", *flags, "--batch_size=4", f"--out_dir={tmp_path / 'single'}"))
    ddp_log = read_log(tmp_path / "ddp" / "logs" / "sft_video_32.jsonl")
    single_log = read_log(tmp_path / "single" / "logs" / "sft_video_32.jsonl")
    assert [r["step"] for r in ddp_log] == [1, 2, 3]   # rank 0 writes, once per step
    assert [r["epoch"] for r in ddp_log] == [0, 1, 1]
    # The loss is normalised by the global token count, so two halves of a batch give the same
    # loss and (after DDP's gradient average) the same update as the whole batch.
    for a, b in zip(ddp_log, single_log):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (ddp_log, single_log)
    assert [r["skipped"] for r in ddp_log] == [r["skipped"] for r in single_log]
    assert ddp_log[0]["skipped"] == 2 and ddp_log[-1]["skipped"] == 4   # both bad samples, both epochs
    ddp_metrics = json.loads((tmp_path / "ddp" / "logs" / "sft_video_32.metrics.json").read_text())
    single_metrics = json.loads((tmp_path / "single" / "logs" / "sft_video_32.metrics.json").read_text())
    assert ddp_metrics["skipped"] == single_metrics["skipped"] == 4
    assert abs(ddp_metrics["val_loss"] - single_metrics["val_loss"]) <= 1e-5
    ddp_weights = load_file(str(tmp_path / "ddp" / "sft_video_32.safetensors"))
    single_weights = load_file(str(tmp_path / "single" / "sft_video_32.safetensors"))
    assert ddp_weights.keys() == single_weights.keys()
    assert max(float((ddp_weights[k] - single_weights[k]).abs().max()) for k in ddp_weights) <= 1e-4
    assert ddp.stdout.count("saved ") == 1
    files = sorted(str(p.relative_to(tmp_path / "ddp")) for p in (tmp_path / "ddp").rglob("*"))
    assert files == ["logs", "logs/sft_video_32.jsonl", "logs/sft_video_32.metrics.json",
                     "sft_video_32.resume.pt", "sft_video_32.safetensors"]


@pytest.mark.parametrize("n, world", [(9, 2), (10, 3), (16, 4), (2, 3)])
def test_each_epoch_is_split_over_ranks_without_repeats_and_padded_at_its_end(n, world):
    for epoch in range(2):
        shares = []
        for rank in range(world):
            sampler = ShardSampler(n, world, rank, seed=7)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        assert len({len(share) for share in shares}) == 1   # every rank as many slots
        # Rank r's k-th slot is global position k × world + r: one process's order, cut in turn.
        order = [shares[r][k] for k in range(len(shares[0])) for r in range(world)]
        assert sorted(order[:n]) == list(range(n))          # every sample once, none repeated
        assert order[n:] == [PAD] * (len(order) - n)        # the padding closes the epoch


def test_every_epoch_is_reshuffled_the_same_way_on_every_rank():
    def order(epoch, world):
        samplers = [ShardSampler(12, world, rank, seed=7) for rank in range(world)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in samplers]
        return [shares[r][k] for k in range(len(shares[0])) for r in range(world)]
    assert order(0, 1) != order(1, 1)
    assert order(0, 2) == order(0, 1) == order(0, 3) and order(1, 2) == order(1, 1)


def test_a_resumed_sampler_continues_with_the_next_batch():
    full = list(ShardSampler(11, 2, 1, seed=3))
    sampler = ShardSampler(11, 2, 1, seed=3)
    sampler.skip = 4
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4


def test_a_model_that_reads_seconds_trains_from_cached_times_and_answers(tmp_path, synthetic, fresh_flags, train,
                                                                         feature_cache):
    """time_encoding seconds end to end: the cache's frame times reach the model in training and eval."""
    out = tmp_path / "out"
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={out}", *fresh_flags, "--time_encoding=seconds", f"--feature_dir={feature_cache}")
    assert result.returncode == 0, result.stderr
    assert "CLIP runs online" not in result.stderr   # the cache has the times this model reads
    meta = json.loads(read_metadata(out / "sft_video_32.safetensors")["vision_config"])
    assert meta["time_encoding"] == "seconds"
    answer = run_python("eval.py", f"--weight={out / 'sft_video_32.safetensors'}", "--max_new_tokens=4",
                        f"--video={synthetic / 'videos' / 't00000.mp4'}", "--prompt=What happens?")
    assert answer.returncode == 0, answer.stderr


def test_an_unknown_time_encoding_is_one_line(tmp_path, synthetic, fresh_flags, train):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={tmp_path}", *fresh_flags, "--time_encoding=minutes")
    assert result.returncode != 0 and "time_encoding" in result.stderr and "Traceback" not in result.stderr
