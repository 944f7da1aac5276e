"""LoRA through peft: adapters on the LM's named linears only, a video-SFT run that writes a peft adapter folder
beside its base, eval.py --lora, scripts/merge_lora.py with identical outputs, resume, and clear errors."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from conftest import read_log
from model import lora
from model.checkpoint import load_checkpoint
from model.lora import LoraError


def ids_and_features(model, seed=0):
    """One prompt with a video's slots in it, and hand-made CLIP features for that video."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.vision_cfg
    ids = torch.randint(4, model.lm_cfg.vocab_size, (1, 12), generator=g)
    ids[0, 2:2 + cfg.num_visual_tokens] = cfg.vision_token_id
    frames = torch.randn(1, cfg.num_frames, cfg.clip_dim, generator=g)
    return ids, frames, torch.ones(1, cfg.num_frames, dtype=torch.bool)


def test_adapters_sit_on_the_lm_linears_named_and_start_as_a_no_op(make_vlm):
    model = make_vlm()
    ids, frames, mask = ids_and_features(model)
    with torch.no_grad():
        before = model(ids, None, frames, mask)
    lora.wrap(model, rank=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # VideoSummary's blocks have a q_proj too: it must stay frozen and unadapted.
    expected = {f"lm.layers.{i}.{where}.lora_{ab}.default.weight"
                for i in range(2) for where in ("attn.q_proj", "mlp.down_proj") for ab in "AB"}
    assert trainable == expected
    assert not any("lora" in n for n, _ in model.summary.named_parameters())
    with torch.no_grad():   # lora_B starts at zero
        assert torch.equal(model(ids, None, frames, mask), before)


def test_full_parts_train_beside_the_adapters_and_bad_choices_are_named(make_vlm):
    model = make_vlm()
    lora.wrap(model, rank=2, alpha=4, dropout=0.0, targets=["v_proj"], full_parts=["projector"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("projector.") for n in trainable)
    assert not any(n.startswith("summary.") for n in trainable)
    with pytest.raises(LoraError, match="trains through its adapters"):
        lora.wrap(make_vlm(), 2, 4, 0.0, ["v_proj"], full_parts=["lm"])
    with pytest.raises(LoraError, match="unknown.*qkv"):
        lora.wrap(make_vlm(), 2, 4, 0.0, ["qkv"])


def test_qlora_on_a_cpu_is_one_clear_error(make_vlm):
    with pytest.raises(LoraError, match="needs a CUDA GPU"):
        lora.quantize_lm_4bit(make_vlm(), "cpu")


# ---------------------------------------------------------------- a real (tiny) LoRA video-SFT run

LORA_FLAGS = ["--lora_rank=4", "--lora_alpha=8", "--lora_dropout=0.05", "--train_parts=projector",
              "--learning_rate=2e-2", "--warmup_steps=0", "--min_lr_ratio=1"]


def lora_sft(train, synthetic, weight_flags, out_dir, *extra):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   "--from_weight=sft_video_32", f"--out_dir={out_dir}", *weight_flags, *LORA_FLAGS, *extra)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, caption_checkpoint, synthetic, weight_flags, train):
    """(out dir holding the base sft_video_32.safetensors, the adapter folder, the run's stdout, base sha).
    The base answers in sentences (conftest's caption_checkpoint), so comparing answers compares text,
    not two empty strings."""
    out = tmp_path_factory.mktemp("lora") / "out"
    out.mkdir()
    shutil.copy(caption_checkpoint, out / "sft_video_32.safetensors")
    sha = lora.file_sha256(out / "sft_video_32.safetensors")
    result = lora_sft(train, synthetic, weight_flags, out, "--max_steps=4", "--save_every=2")
    return out, out / "sft_video_32_lora", result.stdout, sha


def test_lora_run_writes_a_peft_adapter_folder_beside_its_base(lora_run):
    out, adapter, stdout, base_sha = lora_run
    assert {"adapter_config.json", "adapter_model.safetensors", "training_info.json"} <= {
        p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    info = json.loads((adapter / "training_info.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["modules_to_save"] == ["projector"]
    assert config["base_model_name_or_path"] == info["base"] == str(out / "sft_video_32.safetensors")
    assert info["base_sha256"] == base_sha == lora.file_sha256(out / "sft_video_32.safetensors")   # base untouched
    assert info["stage"] == "video" and info["step"] == "4"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k or ".projector." in k for k in keys)
    assert not any(k.split(".")[2] == "summary" for k in keys)
    metrics = json.loads((out / "logs" / "sft_video_32_lora.metrics.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    share = 100 * metrics["trainable_params"] / metrics["total_params"]
    assert f"({share:.2f}%" in stdout
    assert not (out / "sft_video_32_lora.safetensors").exists()   # no full checkpoint from a LoRA run


def test_merged_checkpoint_answers_exactly_as_base_plus_adapter(lora_run):
    from merge_lora import merge
    out, adapter, _, _ = lora_run
    merged_path = merge(str(adapter), out_dir=out)
    assert merged_path == out / "sft_video_32_lora.safetensors"
    base, _ = load_checkpoint(out / "sft_video_32.safetensors")
    ids, frames, mask = ids_and_features(base)
    with torch.no_grad():
        base_logits = base(ids, None, frames, mask)
    unmerged = lora.apply_adapter(base, adapter, merge=False).eval()
    merged, meta = load_checkpoint(merged_path)
    merged.eval()
    assert meta["merged_from"] == str(adapter) and meta["stage"] == "video"
    with torch.no_grad():
        adapted, flat = unmerged(ids, None, frames, mask), merged(ids, None, frames, mask)
    assert (adapted - base_logits).abs().max() > 1e-3   # the adapter changed the model...
    torch.testing.assert_close(flat, adapted, atol=1e-5, rtol=1e-5)   # ...and merging kept that change
    greedy = [torch.cat(list(m.generate(ids, None, frames, mask, max_new_tokens=12))).tolist()
              for m in (unmerged, merged)]
    assert greedy[0] == greedy[1]


def test_eval_lora_finds_its_base_and_answers_as_the_merged_checkpoint(lora_run, synthetic, capsys):
    import eval as evaluation
    from merge_lora import merge
    out, adapter, _, _ = lora_run
    merged = merge(str(adapter), out=out / "merged_for_eval.safetensors")
    video = synthetic / "videos" / "v00000.mp4"
    answers = []
    for source in (["--lora", "sft_video_32_lora"], ["--weight", str(merged)]):
        evaluation.main([*source, "--out_dir", str(out), "--video", str(video), "--prompt", "What happens?",
                         "--max_new_tokens", "12", "--device", "cpu"])
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] and answers[0] == answers[1]


def test_eval_refuses_an_adapter_whose_base_changed(lora_run, tmp_path, capsys):
    import eval as evaluation
    out, adapter, _, _ = lora_run
    moved = tmp_path / "sft_video_32_lora"
    shutil.copytree(adapter, moved)
    info = json.loads((moved / "training_info.json").read_text())
    (moved / "training_info.json").write_text(json.dumps({**info, "base_sha256": "0" * 64}))
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--lora", str(moved), "--prompt", "Hi", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "sha256 differs" in err[0]


def test_lora_resume_continues_as_an_uninterrupted_run(lora_run, tmp_path, synthetic, weight_flags, train):
    out, _, _, _ = lora_run
    resumed, straight = tmp_path / "r", tmp_path / "u"
    for folder in (resumed, straight):
        folder.mkdir()
        shutil.copy(out / "sft_video_32.safetensors", folder)
    shutil.copytree(out / "logs", resumed / "logs")
    shutil.copy(out / "sft_video_32_lora.resume.pt", resumed)   # saved at step 4 (the fixture's last save)
    lora_sft(train, synthetic, weight_flags, resumed, "--max_steps=7", "--resume")
    lora_sft(train, synthetic, weight_flags, straight, "--max_steps=7")
    a, b = (read_log(f / "logs" / "sft_video_32_lora.jsonl") for f in (resumed, straight))
    assert [r["step"] for r in a] == list(range(1, 8))
    # Same batches, same adapter and optimizer state, same dropout draws → same losses.
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-5)


def test_lora_without_a_base_checkpoint_is_one_error_line(synthetic, fresh_flags, train, tmp_path):
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={tmp_path}", *fresh_flags, "--lora_rank=4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--from_weight" in result.stderr.strip().splitlines()[-1]
