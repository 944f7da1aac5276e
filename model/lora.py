"""LoRA on the language model through peft: wrap it for training, save the adapter beside its base, apply or merge it."""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from model.atomic import atomic_write_dir

LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL_PARTS = ("summary", "projector")   # parts that may train in full beside the adapters
INFO_FILE = "training_info.json"        # ours, beside peft's adapter_config.json and adapter_model.safetensors
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoraError(Exception):
    """An adapter that cannot be made, found or applied; the message names the flag or the file."""


def _peft():
    try:
        import peft
    except ImportError:
        raise LoraError("LoRA needs the peft package: pip install peft") from None
    return peft


def target_pattern(targets) -> str:
    """A regex over module names that picks the LM's linear layers called `targets`.

    VideoSummary has its own q_proj/k_proj/... (same Block class), so plain names would adapt it too.
    """
    unknown = sorted(set(targets) - set(LM_LINEARS))
    if unknown or not targets:
        raise LoraError(f"--lora_targets: unknown {unknown or 'empty list'}; choose from {','.join(LM_LINEARS)}")
    return rf"lm\.layers\.\d+\.(attn|mlp)\.({'|'.join(targets)})"


def wrap(model, rank: int, alpha: float, dropout: float, targets, full_parts=()):
    """Inject adapters into `model` in place and return the PeftModel around it.

    Afterwards only the adapters require grad, plus `full_parts` (summary/projector), which peft keeps as
    trained copies (modules_to_save) so that they land in the adapter file and the base stays untouched.
    """
    peft = _peft()
    if rank <= 0:
        raise LoraError(f"--lora_rank must be positive, got {rank}")
    bad = sorted(set(full_parts) - set(FULL_PARTS))
    if bad:
        raise LoraError(f"--train_parts {bad} with --lora_rank: the LM trains through its adapters; "
                        f"only {','.join(FULL_PARTS)} can train in full beside them")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(targets),
                             modules_to_save=list(full_parts) or None)
    return peft.get_peft_model(model, config)


def quantize_lm_4bit(model, device):
    """QLoRA's frozen base: every linear layer of the LM's blocks becomes 4-bit NF4 (bitsandbytes, CUDA only)."""
    if torch.device(device).type != "cuda":
        raise LoraError("--qlora needs a CUDA GPU: bitsandbytes' 4-bit layers do not run on a CPU "
                        "(use --lora_rank without --qlora there)")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LoraError("--qlora needs the bitsandbytes package: pip install bitsandbytes") from None
    for block in model.lm.layers:
        for parent in (block.attn, block.mlp):
            for name in LM_LINEARS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                          compute_dtype=torch.bfloat16, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(linear.weight.data.contiguous(), requires_grad=False, quant_type="nf4")
                    setattr(parent, name, q.to(device))   # quantized on the move to the GPU
    return model


def parameter_count(model, trainable_only=False) -> int:
    """Weights counted once each (tied embeddings are one tensor)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- files

def save_adapter(peft_model, folder, base, base_sha256: str, **info):
    """peft's files (adapter_config.json naming the base, adapter_model.safetensors) + training_info.json; atomic."""
    record = {"base": str(base), "base_sha256": base_sha256, **{k: str(v) for k, v in info.items()}}
    peft_model.peft_config["default"].base_model_name_or_path = str(base)

    def write(tmp):
        peft_model.save_pretrained(str(tmp))
        (Path(tmp) / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")
    atomic_write_dir(folder, write)


def adapter_state(peft_model) -> dict:
    """The trained tensors only (adapters + full parts): all a LoRA run's resume state needs of the model."""
    peft = _peft()
    return {k: v.detach().cpu().clone() for k, v in peft.get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model, state: dict, source):
    """Load adapter tensors strictly: a missing or extra adapter tensor is an error naming `source`."""
    peft = _peft()
    try:
        result = peft.set_peft_model_state_dict(peft_model, state)
    except RuntimeError as e:   # shape mismatch
        raise LoraError(f"{source}: does not fit the model ({str(e).splitlines()[0]})") from None
    # load_state_dict ran non-strict over the whole model: only the adapter's own keys count as missing.
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if missing or result.unexpected_keys:
        raise LoraError(f"{source}: does not fit the model — missing {missing[:5]}, "
                        f"unexpected {list(result.unexpected_keys)[:5]}")


def find_adapter(name, out_dir) -> Path:
    """An adapter folder given as a path or as a name in out_dir."""
    for candidate in (Path(name), Path(out_dir) / name):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise LoraError(f"{name}: no LoRA adapter folder ({CONFIG_FILE}) there or in {out_dir}/")


def read_info(folder) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None


def base_of(folder, weight=None) -> Path:
    """The base checkpoint the adapter was trained on: `weight` if given, else the one it names
    (as recorded, or by file name beside the adapter folder). Its sha256 must match the record."""
    folder = Path(folder)
    info = read_info(folder)
    if weight is not None:
        path = Path(weight)
    elif "base" not in info:
        raise LoraError(f"{folder}: no {INFO_FILE} naming its base checkpoint; pass --weight BASE")
    else:
        candidates = [Path(info["base"]), folder.parent / Path(info["base"]).name]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise LoraError(f"{folder}: its base checkpoint {info['base']} is not there "
                            f"(nor beside the adapter); pass --weight BASE")
    if info.get("base_sha256") and file_sha256(path) != info["base_sha256"]:
        raise LoraError(f"{folder}: was trained on another {Path(info['base']).name} than {path} "
                        "(sha256 differs); an adapter fits only the exact base it was trained on")
    return path


def apply_adapter(model, folder, merge=True):
    """The base `model` with the adapter in `folder` applied: merged into plain layers (merge=True,
    what eval and merge_lora use) or kept as separate LoRA layers (merge=False)."""
    peft = _peft()
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LoraError(f"{folder}: no {WEIGHTS_FILE}")
    try:
        config = peft.LoraConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise LoraError(f"{folder / CONFIG_FILE}: not a LoRA config ({e})") from None
    config.inference_mode = True
    config.base_model_name_or_path = None   # the base is ours to find (base_of); peft would only warn about it
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as e:   # e.g. its target modules are not in this model
        raise LoraError(f"{folder / CONFIG_FILE}: does not fit the model ({e})") from None
    load_adapter_state(wrapped, load_file(str(weights)), weights)
    return wrapped.merge_and_unload() if merge else wrapped.base_model.model
