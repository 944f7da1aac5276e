"""Pickle-free loading: every torch.load in the repo is weights_only=True, nothing else unpickles, and
.pth/.pt files carrying a pickle payload are refused with one line before their code can run."""
import ast

import pytest
import torch

from conftest import CLIP_MODEL, CLIP_SIZE, ROOT
from model.weights_io import CheckpointError, load_torch_file
from model.config import VisionConfig
from model.vision import FrameEncoder, VisionWeightsError, create_clip

UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("torch.jit", "load"), ("joblib", "load"), ("dill", "load"),
              ("cloudpickle", "load")}


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def unsafe_loads(path):
    """(line, call) of every call in a source file that could unpickle arbitrary objects."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        owner, _, attr = name.rpartition(".")
        keywords = {k.arg: k.value for k in node.keywords}
        safe_flag = keywords.get("weights_only")
        if name == "torch.load" and not (isinstance(safe_flag, ast.Constant) and safe_flag.value is True):
            found.append((node.lineno, name))
        elif (owner, attr) in UNPICKLERS:
            found.append((node.lineno, name))
        elif attr == "load" and owner in ("np", "numpy"):
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append((node.lineno, name))
    return found


def test_every_torch_load_in_the_repo_is_weights_only_and_nothing_else_unpickles():
    sources = [p for p in ROOT.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert len(sources) > 20
    offenders = {str(p.relative_to(ROOT)): calls for p in sources if (calls := unsafe_loads(p))}
    assert offenders == {}


def test_the_scan_catches_an_unsafe_load(tmp_path):
    source = tmp_path / "bad.py"
    source.write_text("import torch, pickle\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                      "torch.load('x', weights_only=True)\npickle.loads(b'')\n")
    assert unsafe_loads(source) == [(2, "torch.load"), (3, "torch.load"), (5, "pickle.loads")]


class WritesAMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.fixture
def tower_state():
    torch.manual_seed(0)
    model, _ = create_clip(CLIP_MODEL, CLIP_SIZE)
    return {f"visual.{k}": v for k, v in model.visual.state_dict().items()}


def test_a_plain_pth_vision_tower_loads(tmp_path, tower_state):
    torch.save(tower_state, tmp_path / "tower.pth")
    cfg = VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(tmp_path / "tower.pth"))
    encoder = FrameEncoder(cfg)
    assert torch.equal(encoder.tower.conv1.weight, tower_state["visual.conv1.weight"])


def test_a_pth_vision_tower_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path, tower_state):
    marker = tmp_path / "payload_ran"
    torch.save({**tower_state, "payload": WritesAMarker(marker)}, tmp_path / "evil.pth")
    cfg = VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(tmp_path / "evil.pth"))
    with pytest.raises(VisionWeightsError) as error:
        FrameEncoder(cfg)
    message = str(error.value)
    assert "evil.pth: refused" in message and "(io.open)" in message and "\n" not in message   # the call it hid
    assert not marker.exists()


def test_load_torch_file_names_a_file_that_is_not_torch(tmp_path):
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable PyTorch file"):
        load_torch_file(tmp_path / "junk.pt")
