"""Which parts of the model train: whole parts (--train_parts), or LoRA adapters on the LM."""
from model import lora
from trainer.errors import TrainingError

PARTS = ("summary", "projector", "lm")


def set_trainable(model, parts):
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TrainingError(f"--train_parts: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    for name in PARTS:
        getattr(model, name).requires_grad_(name in parts)


def choose_parts(args, stage: str) -> list:
    """--train_parts, by default all parts; only summary,projector when pretraining from trained weights."""
    pretrained = args.from_weight or args.from_lm
    default_parts = "summary,projector" if (stage == "pretrain" and pretrained) else ",".join(PARTS)
    return (args.train_parts or default_parts).split(",")


def wrap_lora(model, args, weight_path, device):
    """Adapters on the LM (+ --train_parts in full): (the peft model, the parts list recorded in the logs)."""
    if not weight_path:
        raise TrainingError("--lora_rank adapts a trained model: give its checkpoint with --from_weight")
    if not args.lora_rank:
        raise TrainingError("--qlora needs --lora_rank (the adapters are what trains)")
    full_parts = [p for p in (args.train_parts or "").split(",") if p]
    if args.qlora:
        lora.quantize_lm_4bit(model, device)
    targets = [t for t in args.lora_targets.split(",") if t]
    peft = lora.wrap(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, full_parts)
    return peft, [f"lora(r={args.lora_rank}:{'+'.join(targets)})", *full_parts]
