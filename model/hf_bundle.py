"""The whole video model into an exported Hugging Face folder: checkpoint, vision tower, and the code AutoModel runs.

transformers' remote code loads only .py files lying beside the modeling file, so model/hf_remote.py and
every repository module it imports are written flat into the folder (model/engine.py → model_engine.py),
each `from model.x import` made `from .model_x import`. The code is the repository's own, so the folder
answers exactly as eval.py does.
"""
import json
import re
import shutil
from pathlib import Path

from model.atomic import write_safetensors
from model.convert import ConversionError
from model.vision import VISION_DIR, read_weights_metadata
from model.weights_io import CheckpointError, load_torch_state_dict

ROOT = Path(__file__).resolve().parents[1]
ENTRY = "model/hf_remote.py"
MODELING_FILE = "modeling_tiny_video_llm.py"
CHECKPOINT_FILE = "video_llm.safetensors"   # the whole checkpoint, as eval.py / web_demo.py load it
TOWER_FILE = "vision_tower.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
REPO_IMPORT = re.compile(r"^(\s*)from\s+(model|dataset)\.(\w+)\s+import\b", re.M)


def module_closure(entry: str = ENTRY) -> list:
    """Repository files (relative paths) the entry module needs, itself first, following `from model.x import`."""
    found, todo = [], [entry]
    while todo:
        rel = todo.pop(0)
        if rel not in found:
            found.append(rel)
            todo += [f"{package}/{module}.py" for _, package, module in REPO_IMPORT.findall((ROOT / rel).read_text())]
    return found


def flat_name(rel: str) -> str:
    return MODELING_FILE if rel == ENTRY else rel.replace("/", "_")


def write_code(folder: Path) -> list:
    """The modeling file and the modules it needs, flat, imports made relative; returns the file names."""
    names = []
    for rel in module_closure():
        text = REPO_IMPORT.sub(lambda m: f"{m.group(1)}from .{flat_name(f'{m.group(2)}/{m.group(3)}.py')[:-3]} import",
                               (ROOT / rel).read_text())
        (folder / flat_name(rel)).write_text(text)
        names.append(flat_name(rel))
    return names


def write_tower(folder: Path, source: str) -> str:
    """The tower as the folder names it: a local weights file is copied beside the model as safetensors
    (a .pt/.pth/.bin is read as tensors only and rewritten); a pretrained tag stays a tag."""
    if not source.endswith(WEIGHT_SUFFIXES):
        return source   # an open_clip pretrained tag, downloaded by open_clip when the folder is loaded
    if not Path(source).is_file():
        raise ConversionError(f"{source}: the vision weights the checkpoint names are not here; pass --clip_pretrained")
    if source.endswith(".safetensors"):
        shutil.copyfile(source, folder / TOWER_FILE)
    else:
        try:
            state = load_torch_state_dict(source)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
        write_safetensors(folder / TOWER_FILE, {k: v.contiguous() for k, v in state.items()},
                          {k: str(v) for k, v in read_weights_metadata(source).items()})
    return TOWER_FILE


def write_video_model(folder, checkpoint, vision_config: dict):
    """Add the whole video model to an exported LM folder, with the tower vision_config names; returns
    config.json's `video_llm` block, or None when it names no vision weights (the checkpoint file is
    still copied, for eval.py with --clip_pretrained)."""
    folder = Path(folder)
    shutil.copyfile(checkpoint, folder / CHECKPOINT_FILE)
    source = vision_config.get("clip_pretrained", "")
    if not source:
        return None
    block = {"checkpoint": CHECKPOINT_FILE, "vision_tower": write_tower(folder, source), "vision_config_file": None}
    arch = VISION_DIR / f"{vision_config.get('clip_model')}.json"
    if arch.is_file():   # one of the repository's own open_clip architectures
        (folder / "vision_model").mkdir(exist_ok=True)
        shutil.copyfile(arch, folder / "vision_model" / arch.name)
        block["vision_config_file"] = f"vision_model/{arch.name}"
    code = write_code(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModel": f"{MODELING_FILE[:-3]}.TinyVideoLLM"}
    config["video_llm"] = {**block, "code": code}
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return config["video_llm"]
