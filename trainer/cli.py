"""The command line of train_pretrain.py and train_sft.py: the flags, and main, which ends bad input in one line."""
import argparse
import sys

import torch.distributed as dist

from dataset.media import SAMPLING_MODES, MediaError
from model import lora
from model.chat import BadSample, TokenizerError
from model.checkpoint import CheckpointError
from model.convert import ConversionError
from model.lora import LoraError
from model.video_summary import TIME_ENCODINGS
from model.vision import VisionWeightsError
from trainer.errors import PeerStopped, TrainingError
from trainer.loop import Trainer
from trainer.parts import PARTS


def build_parser(stage: str, lr: float, epochs: int, batch_size: int) -> argparse.ArgumentParser:
    """Flags shared by every stage; the stage sets only its own defaults."""
    p = argparse.ArgumentParser(description=f"Train the video LLM, stage: {stage}")
    add_data_flags(p)
    add_weights_flags(p)
    add_schedule_flags(p, lr, epochs, batch_size)
    add_architecture_flags(p)
    add_run_flags(p)
    add_lora_flags(p)
    add_tracker_flags(p)
    return p


def add_data_flags(p):
    """What the run trains and validates on."""
    a = p.add_argument
    a("--data_path", required=True, help="jsonl, one sample per line; or a .parquet file or a save_to_disk dataset folder (docs/data-format.md)")
    a("--media_root", default=None, help="folder media paths are relative to (default: the jsonl's folder)")
    a("--val_path", default=None, help="validation jsonl, .parquet or dataset folder (default: hold out --val_samples training rows)")
    a("--val_samples", type=int, default=64)
    a("--val_every", type=int, default=100, help="optimizer steps between validations (0: never)")


def add_weights_flags(p):
    """Where the run writes, and the weights and tokenizer it starts from."""
    a = p.add_argument
    a("--out_dir", default="out")
    a("--from_weight", default="", help="checkpoint to start from: a path, or a name in --out_dir")
    a("--from_lm", default="",
      help="start only the language model from these weights (the rest fresh): our .safetensors (an LM file "
           "or a checkpoint's LM), a MiniMind .pth, or a Hugging Face Llama or Qwen3 folder; the LM config comes "
           "from them")
    a("--tokenizer", default="model/tokenizer")


def add_schedule_flags(p, lr: float, epochs: int, batch_size: int):
    """How long, how much at a time, how fast, and what trains."""
    a = p.add_argument
    a("--epochs", type=int, default=epochs)
    a("--max_steps", type=int, default=0, help="optimizer steps (0: as many as --epochs give)")
    a("--batch_size", type=int, default=batch_size, help="samples per micro-batch per process")
    a("--accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=lr)
    a("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate × this")
    a("--warmup_steps", type=int, default=20)
    a("--weight_decay", type=float, default=0.1)
    a("--grad_clip", type=float, default=1.0)
    a("--train_parts", default=None,
      help=f"comma list of {','.join(PARTS)} (default: all; in pretrain from --from_weight/--from_lm: summary,projector)")


def add_architecture_flags(p):
    """The model's shape, its frozen tower and how it samples frames."""
    a = p.add_argument
    # Architecture: used when starting fresh; with --from_weight (--from_lm) the checkpoint's (weights') config rules.
    for name, kind in [("hidden_size", int), ("num_layers", int), ("num_heads", int),
                       ("num_kv_heads", int), ("intermediate_size", int), ("vocab_size", int), ("rope_theta", float),
                       ("dropout", float),
                       ("num_frames", int), ("num_visual_tokens", int), ("summary", str),
                       ("summary_dim", int), ("summary_layers", int), ("clip_model", str),
                       ("clip_image_size", int)]:
        a(f"--{name}", type=kind, default=None)
    a("--time_encoding", choices=TIME_ENCODINGS, default=None,
      help="how the temporal summary knows when a frame is: index (a learned vector per frame position; "
           "default), seconds (the frame's absolute time, any number of frames) or none (an ablation)")
    a("--segment_seconds", type=float, default=None,
      help="0 (default): --num_visual_tokens per media; > 0: an appearance and a motion token per time segment "
           "this long, at most --num_visual_tokens (the budget grows with duration)")
    a("--timestamp_text", action=argparse.BooleanOptionalAction, default=None,
      help="with --segment_seconds: write each time segment's start second as text before its two tokens "
           "(' 37'), which the LM can copy into the times it answers")
    a("--clip_pretrained", default=None, help="open_clip pretrained tag or local weights file")
    a("--clip_regions", type=int, default=None,
      help="0 (default): a frame is its CLS feature; g > 0: also its patch tokens averaged over a g x g grid, "
           "side by side (the feature cache keeps the two kinds apart)")
    a("--frame_sampling", choices=SAMPLING_MODES, default=None,
      help="video frames: uniform over the clip (default), or fps: --sample_fps a second, at most --num_frames")
    a("--sample_fps", type=float, default=None, help="frames a second for --frame_sampling fps")
    a("--max_len", type=int, default=512, help="longest sample in tokens; longer ones are skipped")
    a("--feature_dir", default=None,
      help="feature cache folder (default: <data dir>/features/<encoder>-f<T>[-fps<F>]; 'none' disables)")


def add_run_flags(p):
    """Saving and resuming, precision, devices, loaders, and what to do on bad steps and samples."""
    a = p.add_argument
    a("--save_every", type=int, default=0, help="steps between checkpoint + resume-state saves (0: end only)")
    a("--save_name", default=None, help="checkpoint file stem (default: <stage prefix>_<hidden_size>)")
    a("--resume", action="store_true", help="continue from <save_name>.resume.pt in --out_dir")
    a("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
      help="autocast precision (auto: bf16 on CUDA, fp16 with loss scaling where bf16 is unsupported; fp32 on CPU)")
    a("--grad_checkpointing", action="store_true",
      help="recompute each LM block's activations in the backward pass: less memory, about a third more compute")
    a("--max_bad_steps", type=int, default=5, help="steps with a non-finite loss in a row before the run stops")
    a("--seed", type=int, default=42)
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--num_workers", type=int, default=-1, help="DataLoader workers (-1: 0 when features are cached, else 2)")
    a("--group_by_length", action="store_true",
      help="batch samples of alike length together (less padding; beware templated data, where "
           "alike length can mean alike question)")
    a("--pack", action=argparse.BooleanOptionalAction, default=True,
      help="pack each micro-batch's conversations into fewer rows, each attending only to itself (same "
           "samples and loss per step; --no-pack pads every conversation to the longest)")
    a("--compile", action="store_true",
      help="torch.compile the LM's transformer blocks (on small CPU shapes compiling rarely pays for itself); "
           "a block that fails to compile runs eagerly")
    a("--strict", action="store_true", help="stop at the first unreadable sample instead of skipping it")
    a("--no_progress", action="store_true", help="no tqdm bar")


def add_lora_flags(p):
    g = p.add_argument_group("LoRA (peft): train adapters on the LM's linear layers, the base stays frozen")
    g.add_argument("--lora_rank", type=int, default=0, help="adapter rank (0: no LoRA, train the parts in full)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="adapter scale is lora_alpha / lora_rank")
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", default=",".join(lora.LM_LINEARS), help="comma list of the LM's linear layers")
    g.add_argument("--qlora", action="store_true", help="4-bit NF4 frozen base (bitsandbytes; CUDA only)")


def add_tracker_flags(p):
    g = p.add_argument_group("experiment trackers: the same per-step records as out/logs/<run>.jsonl")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--swanlab", action="store_true", help="also log to SwanLab")
    g.add_argument("--tracker_project", default="tiny-video-llm", help="project name in the trackers")


def main(stages, lr: float, epochs: int, batch_size: int):
    """Entry point for the thin train_*.py scripts: bad input ends in one line, not a traceback."""
    parser = build_parser("/".join(stages), lr, epochs, batch_size)
    if len(stages) > 1:
        parser.add_argument("--stage", required=True, choices=stages)
    args = parser.parse_args()
    try:
        Trainer(args, getattr(args, "stage", stages[0])).run()
    except PeerStopped:
        sys.exit(1)
    except (TrainingError, CheckpointError, ConversionError, TokenizerError, BadSample, MediaError,
            VisionWeightsError, LoraError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
