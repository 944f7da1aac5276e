"""scripts/export_hf.py's whole video model: AutoModel(trust_remote_code=True).chat in a process without the
repository answers as eval.py does; safetensors only, no pickle run; the tower as a file or a tag."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_python

QUESTION = "Describe the video."

# Run with `python -I` from an empty folder: no PYTHONPATH, no cwd on sys.path, so the repository cannot be
# imported, only the folder's own copy of its code. Unpickling is made to fail before anything loads.
OUTSIDE = """
import importlib.util, json, pickle, sys
class Refused(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("something tried to unpickle")
def refuse(*args, **kwargs):
    raise RuntimeError("something tried to unpickle")
pickle.Unpickler, pickle.load, pickle.loads = Refused, refuse, refuse
from transformers import AutoModel, AutoModelForCausalLM
folder, video, image = sys.argv[1:4]
model = AutoModel.from_pretrained(folder, trust_remote_code=True)
print(json.dumps({
    "repo_importable": importlib.util.find_spec("model") is not None or importlib.util.find_spec("trainer") is not None,
    "class": type(model).__name__,
    "video": model.chat("Describe the video.", video=video),
    "image": model.chat("Describe the image.", image=image),
    "text": model.chat("Hello", max_new_tokens=8),
    "lm_class": type(AutoModelForCausalLM.from_pretrained(folder)).__name__}))
"""


@pytest.fixture(scope="module")
def exported(caption_checkpoint, tmp_path_factory):
    from export_hf import export
    out = tmp_path_factory.mktemp("hf_video")
    return export(str(caption_checkpoint), out / "hf", out_dir=out)


def media(synthetic):
    return sorted((synthetic / "videos").glob("t*.mp4"))[0], sorted((synthetic / "images").glob("*.png"))[0]


def eval_py(checkpoint, prompt, *media_flags) -> str:
    result = run_python("eval.py", "--weight", checkpoint, "--prompt", prompt, "--temperature", "0",
                        "--device", "cpu", *media_flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_automodel_outside_the_repo_answers_as_eval_py(exported, caption_checkpoint, synthetic, tmp_path):
    video, image = media(synthetic)
    result = subprocess.run([sys.executable, "-I", "-c", OUTSIDE, str(exported), str(video), str(image)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert not got["repo_importable"] and got["class"] == "TinyVideoLLM" and got["lm_class"] == "LlamaForCausalLM"
    assert got["video"] == eval_py(caption_checkpoint, QUESTION, "--video", video)
    assert len(got["video"].split()) >= 3   # a sentence: the comparison is not of two empty strings
    assert got["image"] == eval_py(caption_checkpoint, "Describe the image.", "--image", image)
    assert got["text"] == eval_py(caption_checkpoint, "Hello", "--max_new_tokens", "8")


def test_the_folder_holds_safetensors_weights_only(exported):
    files = [p for p in Path(exported).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".pickle")]
    config = json.loads((Path(exported) / "config.json").read_text())
    block = config["video_llm"]
    assert config["model_type"] == "llama" and config["auto_map"] == {"AutoModel": "modeling_tiny_video_llm.TinyVideoLLM"}
    assert block["vision_tower"] == "vision_tower.safetensors" and (Path(exported) / block["vision_config_file"]).is_file()
    code = [p.name for p in files if p.suffix == ".py"]
    assert sorted(code) == sorted(block["code"]) and "modeling_tiny_video_llm.py" in code
    for name in code:   # every repository import was made relative
        text = (Path(exported) / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+(model|dataset)\b", text, re.M), name


def test_a_pt_tower_is_rewritten_as_safetensors_with_the_same_tensors(caption_checkpoint, vision_file, synthetic, tmp_path):
    from export_hf import export
    from model.hf_remote import TinyVideoLLM
    tower_pt = tmp_path / "tower.pt"
    torch.save(load_file(str(vision_file)), tower_pt)
    folder = export(str(caption_checkpoint), tmp_path / "hf", out_dir=tmp_path, clip_pretrained=str(tower_pt))
    copied, original = load_file(str(folder / "vision_tower.safetensors")), load_file(str(vision_file))
    assert copied.keys() == original.keys() and all(torch.equal(copied[k], original[k]) for k in original)
    video, _ = media(synthetic)
    assert TinyVideoLLM.from_pretrained(folder).chat(QUESTION, video=video) == eval_py(caption_checkpoint, QUESTION,
                                                                                         "--video", video)


def test_a_pretrained_tag_stays_a_tag(caption_checkpoint, tmp_path):
    from export_hf import export
    folder = export(str(caption_checkpoint), tmp_path / "hf", out_dir=tmp_path, clip_pretrained="laion2b_s34b_b79k")
    assert json.loads((folder / "config.json").read_text())["video_llm"]["vision_tower"] == "laion2b_s34b_b79k"
    assert not (folder / "vision_tower.safetensors").exists()
    assert "open_clip downloads it" in (folder / "README.md").read_text()


def test_missing_vision_weights_are_one_line(caption_checkpoint, tmp_path):
    result = run_python("scripts/export_hf.py", "--weight", caption_checkpoint, "--out", tmp_path / "hf",
                        "--clip_pretrained", tmp_path / "nowhere.safetensors")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere.safetensors'}: the vision weights "
                                                  "the checkpoint names are not here; pass --clip_pretrained"]


def test_a_folder_without_the_video_block_is_refused_by_name(tmp_path):
    from model.hf_remote import TinyVideoLLM
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="no 'video_llm' block"):
        TinyVideoLLM.from_pretrained(tmp_path)


def test_a_hub_repo_id_is_downloaded_with_the_given_revision(exported, monkeypatch):
    import huggingface_hub
    from model.hf_remote import TinyVideoLLM
    asked = {}

    def snapshot_download(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(exported)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = TinyVideoLLM.from_pretrained("someone/tiny-video-llm", revision="v1", device_map="ignored")
    assert asked == {"repo_id": "someone/tiny-video-llm", "revision": "v1"}
    assert model.chat("Hello", max_new_tokens=4) == model.engine.reply([{"role": "user", "content": "Hello"}], [],
                                                                       __import__("model.engine").engine.SamplingOptions(max_new_tokens=4))
