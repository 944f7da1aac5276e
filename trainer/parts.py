"""Which parts of the model train: whole parts (--train_parts), or LoRA adapters on the LM."""
from trainer.errors import TrainingError

PARTS = ("summary", "projector", "lm")


def set_trainable(model, parts):
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TrainingError(f"--train_parts: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    for name in PARTS:
        getattr(model, name).requires_grad_(name in parts)
