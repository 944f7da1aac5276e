"""The model configs of a run: from the flags, from --from_weight's checkpoint, or (LM only) --from_lm's weights."""
import json
import math
from dataclasses import fields

from dataset.media import sampling_rate
from model.chat import VISION_PAD
from model.checkpoint import find_checkpoint, read_metadata
from model.config import LMConfig, VisionConfig, config_from_dict
from model.convert import grow_vocab, read_lm
from model.video_summary import check_summary_config
from trainer.errors import TrainingError

# Settings a stage may change when it starts --from_weight (or --from_lm): which weights file holds
# the frozen tower, how video frames are sampled (image stages never sample; the video stage
# decides, and its checkpoint records what it used, so eval samples the same way), and dropout.
STAGE_SETTINGS = {"clip_pretrained", "frame_sampling", "sample_fps", "dropout"}


def resolve_configs(args):
    """(lm_cfg, vision_cfg, checkpoint path or None, LM state or None): from the flags, from
    --from_weight's metadata, or (LM only) from --from_lm's weights.

    Flags may not contradict a checkpoint's config, except those in STAGE_SETTINGS; the weights
    are loaded later, once the encoder has fixed the CLIP feature width.
    """
    lm_flags, vis_flags = flags_for(LMConfig, args), flags_for(VisionConfig, args)
    if vis_flags.get("frame_sampling") == "uniform":   # a checkpoint's fps rate does not carry over
        vis_flags.setdefault("sample_fps", 0.0)
    lm_state = None
    if args.from_lm:
        lm_cfg, vis_cfg, path, lm_state = configs_from_lm(args, lm_flags, vis_flags)
    elif args.from_weight:
        lm_cfg, vis_cfg, path = configs_from_checkpoint(args, lm_flags, vis_flags)
    else:
        lm_cfg, vis_cfg, path = fresh_configs(lm_flags, vis_flags)
    try:
        sampling_rate(vis_cfg)
    except ValueError as e:
        raise TrainingError(f"--frame_sampling/--sample_fps: {e}") from None
    try:
        check_summary_config(vis_cfg)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    return lm_cfg, vis_cfg, path, lm_state


def flags_for(config_class, args) -> dict:
    """The flags given for the fields of config_class (a flag left at None was not given)."""
    return {f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name, None) is not None}


def adopt_flags(cfg, flags: dict, source, whose: str, theirs: str):
    """Flags on a loaded config: those in STAGE_SETTINGS are applied, any other must agree with it."""
    clash = {k: (v, getattr(cfg, k)) for k, v in flags.items() if k not in STAGE_SETTINGS and getattr(cfg, k) != v}
    if clash:
        raise TrainingError(f"{source}: flags contradict {whose} config (flag, {theirs}): {clash}")
    for name in STAGE_SETTINGS & set(flags):
        setattr(cfg, name, flags[name])


def configs_from_lm(args, lm_flags: dict, vis_flags: dict):
    """The LM's config (and state) from --from_lm's weights; the vision side from the flags."""
    if args.from_weight:
        raise TrainingError("--from_lm and --from_weight both given: pick one")
    # A MiniMind .pth cannot always tell its head count or RoPE base; the flags (or its generation's values) do.
    lm_cfg, lm_state = read_lm(args.from_lm, num_heads=lm_flags.get("num_heads"), rope_theta=lm_flags.get("rope_theta"))
    adopt_flags(lm_cfg, lm_flags, args.from_lm, "the LM's", "weights")
    return lm_cfg, VisionConfig(**vis_flags), None, lm_state


def configs_from_checkpoint(args, lm_flags: dict, vis_flags: dict):
    """Both configs from --from_weight's checkpoint metadata."""
    path = find_checkpoint(args.from_weight, args.out_dir)
    meta = read_metadata(path)
    lm_cfg = config_from_dict(LMConfig, json.loads(meta["lm_config"]))
    vis_cfg = config_from_dict(VisionConfig, json.loads(meta["vision_config"]))
    for cfg, flags in ((lm_cfg, lm_flags), (vis_cfg, vis_flags)):
        adopt_flags(cfg, flags, path, "the checkpoint's", "checkpoint")
    return lm_cfg, vis_cfg, path


def fresh_configs(lm_flags: dict, vis_flags: dict):
    """Both configs from the flags (and the configs' defaults), for a model starting from scratch."""
    if "intermediate_size" not in lm_flags and "hidden_size" in lm_flags:
        # SwiGLU width ≈ 8/3 × hidden, rounded up to a multiple of 64 (MiniMind's rule: 512 → 1408).
        lm_flags["intermediate_size"] = 64 * math.ceil(lm_flags["hidden_size"] * 8 / 3 / 64)
    return LMConfig(**lm_flags), VisionConfig(**vis_flags), None


def fit_lm_vocab(lm_cfg, lm_state, tokenizer, source):
    """Grow a loaded LM by the slot token load_tokenizer appended (MiniMind2's tokenizer has none)."""
    appended = [tokenizer.convert_ids_to_tokens(i) for i in range(lm_cfg.vocab_size, len(tokenizer))]
    if appended and lm_state is not None and set(appended) == {VISION_PAD}:
        return grow_vocab(lm_cfg, lm_state, len(tokenizer))
    if appended:
        hint = "use the tokenizer these weights were trained with" if source else f"pass --vocab_size {len(tokenizer)}"
        raise TrainingError(f"vocab_size {lm_cfg.vocab_size} < the tokenizer's {len(tokenizer)} tokens ({hint})")
    return lm_cfg, lm_state
