"""scripts/export_hf.py: the exported folder (LM, tokenizer, whole video model, model card with data, stages and
metrics) and --push_to_hub, where only the Hub upload call is faked; no token / no network is one line."""
import json
import os

import pytest

from conftest import run_python, tiny_vlm
from model.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def three_stages(tmp_path_factory, tokenizer_dir, tokenizer, vocab_size, vision_file):
    """out/ with pretrain → image SFT → video SFT checkpoints (each naming its source and data), the last
    run's end metrics in logs/, and an eval metrics file."""
    out = tmp_path_factory.mktemp("share") / "out"
    (out / "logs").mkdir(parents=True)
    model = tiny_vlm(vocab_size=vocab_size, vision_token_id=tokenizer.convert_tokens_to_ids("<|vision_pad|>"))
    model.vision_cfg.clip_pretrained = str(vision_file)
    source = ""
    for prefix, stage, data in (("pretrain_vlm", "pretrain", "data/pretrain.jsonl"),
                                ("sft_image", "image", "data/sft_image.jsonl"),
                                ("sft_video", "video", "data/sft_video.jsonl")):
        path = out / f"{prefix}_32.safetensors"
        save_checkpoint(model, path, stage=stage, step=7, tokenizer=str(tokenizer_dir), parts="summary,projector,lm",
                        source=source, data=data)
        source = str(path)
    (out / "logs" / "sft_video_32.metrics.json").write_text(json.dumps({"step": 7, "val_loss": 0.4321}))
    metrics = out / "eval_metrics.json"
    metrics.write_text(json.dumps({"accuracy": 0.8765, "n": 42, "by_category": {"colour": 0.9, "order": 0.75}}))
    return out, metrics


def test_export_folder_holds_lm_tokenizer_video_model_and_a_card(three_stages, tmp_path):
    from export_hf import main
    out, metrics = three_stages
    folder = tmp_path / "hf"
    main(["--weight", "sft_video_32", "--out_dir", str(out), "--out", str(folder), "--metrics", str(metrics)])
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "video_llm.safetensors", "README.md"} <= names
    assert (folder / "video_llm.safetensors").read_bytes() == (out / "sft_video_32.safetensors").read_bytes()
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    # The stages in training order, each with its data; the last run's val loss; the eval metrics.
    stages = [card.index(f"`{name}_32`") for name in ("pretrain_vlm", "sft_image", "sft_video")]
    assert stages == sorted(stages)
    for data in ("data/pretrain.jsonl", "data/sft_image.jsonl", "data/sft_video.jsonl"):
        assert f"`{data}`" in card
    assert "0.4321" in card and "0.8765" in card and "| order | 0.75 |" in card
    assert "RANDOMLY INITIALISED" in card   # the test tower is a seeded random one, and the card says so


def test_push_to_hub_uploads_exactly_the_exported_folder(three_stages, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from export_hf import main
    out, metrics = three_stages
    calls = []

    class RecordingHub:   # stands in for the network side of HfApi only
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in os.scandir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    folder = tmp_path / "hf"
    main(["--weight", "sft_video_32", "--out_dir", str(out), "--out", str(folder), "--metrics", str(metrics),
          "--push_to_hub", "someone/tiny-video-llm", "--private", "--token", "hf_test"])
    assert calls[0] == ("token", "hf_test")
    assert calls[1] == ("create_repo", "someone/tiny-video-llm", True, True)
    assert calls[2] == ("upload_folder", "someone/tiny-video-llm", sorted(p.name for p in folder.iterdir()))
    assert "https://huggingface.co/someone/tiny-video-llm" in capsys.readouterr().out


@pytest.mark.parametrize("env, words", [
    ({}, "no Hugging Face token"),
    # A token but nothing listening where the Hub should be: the real client fails, one line says so.
    ({"HF_TOKEN": "hf_test", "HF_ENDPOINT": "http://127.0.0.1:9"}, "upload failed"),
])
def test_push_without_token_or_network_is_one_line(three_stages, tmp_path, monkeypatch, env, words):
    out, _ = three_stages
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for key, value in {"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", **env}.items():
        monkeypatch.setenv(key, value)
    result = run_python("scripts/export_hf.py", "--weight", "sft_video_32", "--out_dir", out,
                        "--out", tmp_path / "hf", "--push_to_hub", "someone/tiny-video-llm", timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(err) == 1 and words in err[0]
    assert (tmp_path / "hf" / "README.md").is_file()   # the export itself was done before the upload
