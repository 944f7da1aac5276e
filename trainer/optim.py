"""How the weights update: the learning-rate schedule, AdamW, autocast precision and compiled blocks."""
import math

import torch


def autocast_dtype(flag: str, device):
    """The autocast dtype for --dtype on this device (None: plain fp32)."""
    if flag == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def lr_at(step: int, total: int, args) -> float:
    """Linear warmup, then cosine from learning_rate down to learning_rate × min_lr_ratio."""
    if step < args.warmup_steps:
        return args.learning_rate * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.learning_rate * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def make_optimizer(model, args, device):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one call, faster than the per-tensor loop on a CPU
    # too, which matters for small models whose step is short.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def compile_blocks(lm):
    """torch.compile every transformer block in place (parameter names and checkpoints unchanged);
    dynamo's suppress_errors runs a block that fails to compile eagerly instead of stopping the run.
    On small CPU shapes compiling rarely pays for itself."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    for block in lm.layers:
        block.compile()
