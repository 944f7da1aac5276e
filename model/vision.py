"""The frozen open_clip image tower: build it, load its weights (tag or local file), turn frames into CLS features."""
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.config import VisionConfig

VISION_DIR = Path(__file__).parent / "vision_model"


def register_local_configs():
    """Make the architectures described by json files in model/vision_model/ known to open_clip."""
    import open_clip
    for path in sorted(VISION_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


def create_clip(model_name: str, image_size: int = 0, pretrained_tag: str = ""):
    """An open_clip CLIP model (random init unless a hub tag is given) and its eval transform."""
    import logging
    import open_clip
    register_local_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r}")
    kwargs = {"force_image_size": image_size} if image_size else {}
    # open_clip warns "initialized randomly" whenever no tag is given; we load weights ourselves.
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained_tag or None, **kwargs)
    finally:
        logging.getLogger().setLevel(level)
    return model, preprocess


def save_random_tower(model_name: str, image_size: int, seed: int, out_path: str):
    """Write a seeded random-init image tower as a weights file, marked random in its metadata.

    open_clip's own init, except the positional embedding: open_clip draws it at std
    width**-0.5 (~0.05), about 20x below the patch embeddings, so a random tower's CLS is nearly
    blind to *where* things are (a linear probe reads position at ~45% on 5 classes). Trained
    ViTs carry a strong, smooth position signal, so the stand-in uses open_clip's fixed 2D
    sin-cos table instead (the probe then reads position at 100%).
    """
    from open_clip.pos_embed import get_2d_sincos_pos_embed
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model, _ = create_clip(model_name, image_size)
    pos = model.visual.positional_embedding
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid != pos.shape[0] - 1:
        raise ValueError(f"{model_name} at {image_size}px: the random stand-in needs a square patch grid")
    with torch.no_grad():
        pos.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[1], grid, cls_token=True)))
    state = {f"visual.{k}": v.contiguous() for k, v in model.visual.state_dict().items()}
    meta = {"random_init": "true", "seed": str(seed), "clip_model": model_name,
            "image_size": str(image_size), "positional_embedding": "2d-sincos"}
    tmp = f"{out_path}.tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, out_path)


def _load_local_weights(model, path: str):
    """Load a local open_clip checkpoint: either the whole CLIP model or only `visual.*` keys."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if all(k.startswith("visual.") for k in state):
        visual = {k.removeprefix("visual."): v for k, v in state.items()}
        model.visual.load_state_dict(visual, strict=True)
    else:
        model.load_state_dict(state, strict=True)


def weights_are_random(path: str) -> bool:
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return False
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("random_init") == "true"


class FrameEncoder:
    """Frozen CLIP image tower. encode(frames uint8 (T,H,W,3)) → (T, clip_dim) pooled CLS features."""

    def __init__(self, cfg: VisionConfig, device="cpu"):
        source = cfg.clip_pretrained
        if not source:   # an unseeded random tower would differ between training and eval
            raise FileNotFoundError("no vision weights: pass --clip_pretrained with an open_clip tag or a "
                                    "local weights file (scripts/make_random_vision.py writes the offline one)")
        is_file = source.endswith((".safetensors", ".pt", ".pth", ".bin"))
        if is_file and not os.path.exists(source):
            raise FileNotFoundError(f"{source}: vision weights file not found "
                                    f"(make it with scripts/make_random_vision.py or download_vision.py)")
        model, self.preprocess = create_clip(cfg.clip_model, cfg.clip_image_size,
                                             "" if is_file else source)
        if is_file:
            _load_local_weights(model, source)
        self.tower = model.visual.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.dim = int(self.tower.output_dim)
        self.is_random = weights_are_random(source)
        self.cache_tag = encoder_cache_tag(cfg)

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (T,H,W,3) → float (T,3,S,S) with the model's own open_clip transform."""
        return torch.stack([self.preprocess(Image.fromarray(f)) for f in frames])

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
        chunks = [self.tower(pixels[i:i + batch].to(self.device)) for i in range(0, len(pixels), batch)]
        return torch.cat(chunks).float()

    def encode(self, frames: np.ndarray) -> torch.Tensor:
        return self.encode_pixels(self.pixels(frames))


def encoder_cache_tag(cfg: VisionConfig) -> str:
    """Names the encoder for the feature cache: architecture, size, and which weights."""
    source = cfg.clip_pretrained
    if os.path.exists(source):   # a file: its content decides, not its name
        digest = hashlib.sha1()
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        source = f"{Path(source).stem}-{digest.hexdigest()[:10]}"
    size = cfg.clip_image_size or "default"
    return f"{cfg.clip_model}-{size}-{source or 'noweights'}".replace("/", "_")
