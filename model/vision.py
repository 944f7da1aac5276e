"""The frozen open_clip image tower: build it, load its weights (tag or local file), turn pixels into CLS features."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.atomic import write_safetensors
from model.config import MAX_REGIONS, VisionConfig
from model.weights_io import CheckpointError, load_torch_state_dict, misfit, read_safetensors_metadata

VISION_DIR = Path(__file__).parent / "vision_model"


def register_local_configs():
    """Make the architectures described by json files in model/vision_model/ known to open_clip."""
    import open_clip
    for path in sorted(VISION_DIR.glob("*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)


class VisionWeightsError(ValueError):
    """Vision weights that cannot be used as asked; the message names the file or tag and the problem."""


def check_pretrained_tag(model_name: str, tag: str) -> dict:
    """open_clip's config for a pretrained tag of this model; refuses an unknown tag or an activation mismatch."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg
    tag_cfg = get_pretrained_cfg(model_name, tag)
    if not tag_cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise VisionWeightsError(f"{model_name}: no pretrained tag {tag!r} in open_clip "
                                 f"(known: {', '.join(known) or 'none'})")
    # open_clip only warns here, and the weights then run through the wrong activation.
    model_quick_gelu = (open_clip.get_model_config(model_name) or {}).get("quick_gelu", False)
    if tag_cfg.get("quick_gelu", False) != model_quick_gelu:
        other = model_name.removesuffix("-quickgelu") if model_quick_gelu else f"{model_name}-quickgelu"
        raise VisionWeightsError(f"{model_name}/{tag}: the tag was trained with"
                                 f"{'' if tag_cfg.get('quick_gelu') else 'out'} QuickGELU; "
                                 f"use --clip_model {other}")
    return tag_cfg


def create_clip(model_name: str, image_size: int = 0, pretrained_tag: str = "", preprocess_cfg=None,
                cache_dir=None):
    """An open_clip CLIP model (random init unless a hub tag is given) and its eval transform.

    preprocess_cfg: the preprocessing stored with local weights (mean, std, interpolation, resize
    mode of the tag they came from); it replaces the architecture's default transform.
    cache_dir: where open_clip keeps downloaded checkpoints (None: its default).
    """
    import logging
    import open_clip
    register_local_configs()
    if model_name not in open_clip.list_models():
        raise VisionWeightsError(f"unknown open_clip model {model_name!r}")
    if pretrained_tag:
        check_pretrained_tag(model_name, pretrained_tag)
    kwargs = {"force_image_size": image_size} if image_size else {}
    # open_clip warns "initialized randomly" whenever no tag is given; we load weights ourselves.
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained_tag or None, cache_dir=cache_dir, **kwargs)
    finally:
        logging.getLogger().setLevel(level)
    if preprocess_cfg:
        from open_clip.transform import PreprocessCfg, image_transform_v2
        # The input size is the model's own; only how pixels get there comes from the file.
        merged = {**model.visual.preprocess_cfg, **{k: v for k, v in preprocess_cfg.items() if k != "size"}}
        preprocess = image_transform_v2(PreprocessCfg(**merged), is_train=False)
    return model, preprocess


def size_text(size) -> str:
    """224 or (224, 224) → "224"; (224, 336) → "224x336": how weights files record their input size."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return str(height) if height == width else f"{height}x{width}"


def save_image_tower(model, out_path, **meta):
    """Write the image tower's `visual.*` weights, its input size and its preprocessing to a safetensors file.

    meta: clip_model, pretrained, random_init, ... (stored as strings in the metadata).
    """
    state = {f"visual.{k}": v.detach().contiguous().cpu() for k, v in model.visual.state_dict().items()}
    preprocess_cfg = dict(model.visual.preprocess_cfg)
    meta = {**{k: str(v) for k, v in meta.items()}, "image_size": size_text(preprocess_cfg["size"]),
            "preprocess_cfg": json.dumps(preprocess_cfg)}
    write_safetensors(out_path, state, meta)


def read_weights_metadata(path: str) -> dict:
    """The metadata of a local safetensors weights file ({} for other formats)."""
    if not path.endswith(".safetensors") or not os.path.exists(path):
        return {}
    try:
        return read_safetensors_metadata(path)
    except CheckpointError as e:
        raise VisionWeightsError(str(e)) from None


def save_random_tower(model_name: str, image_size: int, seed: int, out_path: str):
    """Write a seeded random-init image tower as a weights file, marked random in its metadata.

    open_clip's own init, except the positional embedding: open_clip draws it at std
    width**-0.5, far below the patch embeddings, so a random tower's CLS is nearly blind to
    *where* things are (docs/findings.md). Trained ViTs carry a strong, smooth position signal,
    so the stand-in uses open_clip's fixed 2D sin-cos table instead.
    """
    from open_clip.pos_embed import get_2d_sincos_pos_embed
    torch.manual_seed(seed)
    model, _ = create_clip(model_name, image_size)
    pos = model.visual.positional_embedding
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    if grid * grid != pos.shape[0] - 1:
        raise VisionWeightsError(f"{model_name} at {image_size}px: the random stand-in needs a square patch grid")
    with torch.no_grad():
        pos.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[1], grid, cls_token=True)))
    save_image_tower(model, out_path, random_init="true", seed=seed, clip_model=model_name,
                     positional_embedding="2d-sincos")


def _load_local_weights(model, path: str):
    """Load a local open_clip checkpoint, strictly: either the whole CLIP model or only `visual.*` keys."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = {k.removeprefix("module."): v for k, v in load_file(path).items()}
        else:   # .pt/.pth/.bin: tensors only; a file carrying pickled code is refused unrun
            state = load_torch_state_dict(path)
    except CheckpointError as e:
        raise VisionWeightsError(str(e)) from None
    target = model
    if all(k.startswith("visual.") for k in state):
        target, state = model.visual, {k.removeprefix("visual."): v for k, v in state.items()}
    problems = misfit({k: v.shape for k, v in target.state_dict().items()}, state)
    if problems:
        raise VisionWeightsError(f"{path}: weights do not fit the configured tower ({problems})")
    target.load_state_dict(state, strict=True)


def weights_are_random(path: str) -> bool:
    return read_weights_metadata(path).get("random_init") == "true"


def region_means(tokens: torch.Tensor, regions: int) -> torch.Tensor:
    """Patch tokens (T, P, w) of a square patch grid → (T, regions², w): their mean over each cell of a
    regions × regions grid, row by row from the top left."""
    T, P, w = tokens.shape
    grid = int(round(P ** 0.5))
    if grid * grid != P or grid < regions:
        raise VisionWeightsError(f"clip_regions {regions}: the tower's {P} patch tokens are not a square grid "
                                 f"of at least {regions} x {regions}")
    cells = torch.nn.functional.adaptive_avg_pool2d(tokens.transpose(1, 2).reshape(T, w, grid, grid), regions)
    return cells.flatten(2).transpose(1, 2)


class FrameEncoder:
    """Frozen CLIP image tower. encode(pixels uint8 (T,H,W,3)) → features (T, clip_dim): the pooled CLS, and
    with clip_regions g the projected means of the patch tokens over a g x g grid beside it.

    Why regions: the CLS of a frame with two objects mixes them into one vector, so which of them moved
    or changed is hard to read back; a region's mean keeps what is where (docs/findings.md)."""

    def __init__(self, cfg: VisionConfig, device="cpu"):
        source = cfg.clip_pretrained
        if not source:   # an unseeded random tower would differ between training and eval
            raise FileNotFoundError("no vision weights: pass --clip_pretrained with an open_clip tag or a "
                                    "local weights file (scripts/make_random_vision.py writes the offline one)")
        is_file = source.endswith((".safetensors", ".pt", ".pth", ".bin"))
        if is_file and not os.path.exists(source):
            raise FileNotFoundError(f"{source}: vision weights file not found "
                                    f"(make it with scripts/make_random_vision.py or download_vision.py)")
        meta = read_weights_metadata(source) if is_file else {}
        if meta.get("clip_model", cfg.clip_model) != cfg.clip_model:
            raise VisionWeightsError(f"{source}: weights of {meta['clip_model']}, but the config names "
                                     f"{cfg.clip_model} (pass --clip_model {meta['clip_model']})")
        stored_preprocess = json.loads(meta["preprocess_cfg"]) if "preprocess_cfg" in meta else None
        model, self.preprocess = create_clip(cfg.clip_model, cfg.clip_image_size,
                                             "" if is_file else source, stored_preprocess)
        if "image_size" in meta and meta["image_size"] != size_text(model.visual.preprocess_cfg["size"]):
            raise VisionWeightsError(f"{source}: weights for {meta['image_size']} px input, but the config "
                                     f"asks {size_text(model.visual.preprocess_cfg['size'])} px "
                                     f"(pass --clip_image_size {meta['image_size'].split('x')[0]})")
        if is_file:
            _load_local_weights(model, source)
        self.tower = model.visual.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.regions = cfg.clip_regions
        if self.regions:
            if not hasattr(self.tower, "output_tokens") or not 1 <= self.regions <= MAX_REGIONS:
                raise VisionWeightsError(f"clip_regions {self.regions}: needs a ViT tower and 1..{MAX_REGIONS} "
                                         f"regions a side ({cfg.clip_model}: {type(self.tower).__name__})")
            self.tower.output_tokens = True
        self.dim = int(self.tower.output_dim) * (1 + self.regions ** 2)
        self.is_random = weights_are_random(source)
        self.cache_tag = encoder_cache_tag(cfg)

    def clip_inputs(self, pixels: np.ndarray) -> torch.Tensor:
        """Pixels, uint8 (T,H,W,3) of any size and aspect → the tower's float (T,3,S,S) input, through
        open_clip's eval transform for this model (or the one stored with its weights)."""
        return torch.stack([self.preprocess(Image.fromarray(frame)) for frame in pixels])

    @torch.no_grad()
    def encode_inputs(self, clip_inputs: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Clip inputs (T,3,S,S) → features (T, dim), in chunks of `batch` frames."""
        chunks = [self.frame_features(clip_inputs[i:i + batch].to(self.device))
                  for i in range(0, len(clip_inputs), batch)]
        return torch.cat(chunks).float()

    def frame_features(self, clip_inputs: torch.Tensor) -> torch.Tensor:
        """One batch of clip inputs → (B, dim): the CLS, then each region's mean (in the CLS's projected space)."""
        if not self.regions:
            return self.tower(clip_inputs)
        pooled, tokens = self.tower(clip_inputs)
        cells = region_means(tokens, self.regions)
        if self.tower.proj is not None:
            cells = cells @ self.tower.proj
        return torch.cat([pooled[:, None], cells], dim=1).flatten(1)

    def encode(self, pixels: np.ndarray) -> torch.Tensor:
        """Pixels uint8 (T,H,W,3) → features (T, dim)."""
        return self.encode_inputs(self.clip_inputs(pixels))


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
    regions = f"-r{cfg.clip_regions}" if cfg.clip_regions else ""
    return f"{cfg.clip_model}-{size}-{source or 'noweights'}{regions}".replace("/", "_")
