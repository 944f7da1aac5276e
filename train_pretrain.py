"""Stage 1: caption pretraining — aligns VideoSummary + projector with the LM (the LM too when it starts from scratch)."""
from trainer.cli import main

if __name__ == "__main__":
    main(("pretrain",), lr=1e-3, epochs=4, batch_size=32)
