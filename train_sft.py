"""Stages 2 and 3: supervised fine-tuning on image (--stage image) or video (--stage video) conversations."""
from trainer.cli import main

if __name__ == "__main__":
    main(("image", "video"), lr=5e-4, epochs=3, batch_size=32)
