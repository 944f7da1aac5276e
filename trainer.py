"""The one training loop behind train_pretrain.py and train_sft.py: data, DDP, schedule, logs, checkpoints, resume."""
import argparse
from contextlib import nullcontext
import glob
import importlib
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import fields
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dataset.features import open_cache
from dataset.vlm_dataset import ConversationDataset, collate, frames_and_mask
from model.chat import VISION_PAD, BadSample, ChatEncoder, TokenizerError, load_tokenizer
from dataset.media import SAMPLING_MODES, MediaError, sampling_rate
from model.checkpoint import (CheckpointError, atomic_write, find_checkpoint, load_torch_file, load_weights,
                              read_metadata, remove_stale_temps, save_checkpoint)
from model.config import LMConfig, VisionConfig, config_from_dict
from model.convert import ConversionError, grow_vocab, load_into, read_lm
from model import lora
from model.lora import LoraError
from model.vision import FrameEncoder, VisionWeightsError
from model.vlm import VideoLLM

STAGE_PREFIX = {"pretrain": "pretrain_vlm", "image": "sft_image", "video": "sft_video"}
PARTS = ("summary", "projector", "lm")
# Settings a stage may change when it starts --from_weight (or --from_lm): which weights file holds
# the frozen tower, how video frames are sampled (image stages never sample; the video stage
# decides, and its checkpoint records what it used, so eval samples the same way), and dropout.
STAGE_SETTINGS = {"clip_pretrained", "frame_sampling", "sample_fps", "dropout"}
PAD = -1   # a sampler slot holding no sample (see ShardSampler)
# What a resume state must agree on with the run resuming it: the data position and the per-rank
# RNG states mean nothing under another split of the data.
RESUME_KEYS = ("world_size", "batch_size", "accumulation_steps", "seed", "train_samples")


class PeerStopped(Exception):
    """Another rank stopped the run and said why; this rank exits quietly with status 1."""


class TrainingError(Exception):
    """Stops a run with one clear line (bad flags, missing files, diverged loss)."""


def build_parser(stage: str, lr: float, epochs: int, batch_size: int) -> argparse.ArgumentParser:
    """Flags shared by every stage; the stage sets only its own defaults."""
    p = argparse.ArgumentParser(description=f"Train the video LLM, stage: {stage}")
    a = p.add_argument
    a("--data_path", required=True, help="jsonl in the DESIGN.md schema")
    a("--media_root", default=None, help="folder media paths are relative to (default: the jsonl's folder)")
    a("--val_path", default=None, help="validation jsonl (default: hold out --val_samples training rows)")
    a("--val_samples", type=int, default=64)
    a("--val_every", type=int, default=100, help="optimizer steps between validations (0: never)")
    a("--out_dir", default="out")
    a("--from_weight", default="", help="checkpoint to start from: a path, or a name in --out_dir")
    a("--from_lm", default="",
      help="start only the language model from these weights (the rest fresh): our .safetensors (an LM file "
           "or a checkpoint's LM), a MiniMind .pth, or a Hugging Face Llama folder; the LM config comes from them")
    a("--tokenizer", default="model/tokenizer")
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
    # Architecture: used when starting fresh; with --from_weight (--from_lm) the checkpoint's (weights') config rules.
    for name, kind in [("hidden_size", int), ("num_layers", int), ("num_heads", int),
                       ("num_kv_heads", int), ("intermediate_size", int), ("vocab_size", int), ("rope_theta", float),
                       ("dropout", float),
                       ("num_frames", int), ("num_visual_tokens", int), ("summary", str),
                       ("summary_dim", int), ("summary_layers", int), ("clip_model", str),
                       ("clip_image_size", int)]:
        a(f"--{name}", type=kind, default=None)
    a("--clip_pretrained", default=None, help="open_clip pretrained tag or local weights file")
    a("--frame_sampling", choices=SAMPLING_MODES, default=None,
      help="video frames: uniform over the clip (default), or fps: --sample_fps a second, at most --num_frames")
    a("--sample_fps", type=float, default=None, help="frames a second for --frame_sampling fps")
    a("--max_len", type=int, default=512, help="longest sample in tokens; longer ones are skipped")
    a("--feature_dir", default=None,
      help="feature cache folder (default: <data dir>/features/<encoder>-f<T>[-fps<F>]; 'none' disables)")
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
    a("--compile", action="store_true",
      help="torch.compile the LM's transformer blocks (on the demo's CPU shapes ~45 s of compiling buys ~10%% "
           "faster steps: not worth it there); a block that fails to compile runs eagerly")
    a("--strict", action="store_true", help="stop at the first unreadable sample instead of skipping it")
    a("--no_progress", action="store_true", help="no tqdm bar")
    g = p.add_argument_group("LoRA (peft): train adapters on the LM's linear layers, the base stays frozen")
    g.add_argument("--lora_rank", type=int, default=0, help="adapter rank (0: no LoRA, train the parts in full)")
    g.add_argument("--lora_alpha", type=float, default=16.0, help="adapter scale is lora_alpha / lora_rank")
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", default=",".join(lora.LM_LINEARS), help="comma list of the LM's linear layers")
    g.add_argument("--qlora", action="store_true", help="4-bit NF4 frozen base (bitsandbytes; CUDA only)")
    g = p.add_argument_group("experiment trackers: the same per-step records as out/logs/<run>.jsonl")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--swanlab", action="store_true", help="also log to SwanLab")
    g.add_argument("--tracker_project", default="tiny-video-llm", help="project name in the trackers")
    return p


# ---------------------------------------------------------------- distributed set-up

def setup_distributed(device_flag: str):
    """(rank, world, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}" if world > 1 else
                              (device_flag if device_flag.startswith("cuda") else "cuda"))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes on one machine share its cores; oversubscription is much slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def wrap_ddp(model, device):
    """DDP without re-sending buffers at every forward: they (feature statistics, RoPE tables) never
    change in training, and DDP copies rank 0's to every rank at the start."""
    no_resend = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"   # its older name
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **{no_resend: False})


def autocast_dtype(flag: str, device):
    """The autocast dtype for --dtype on this device (None: plain fp32)."""
    if flag == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def all_sum(value: float, world: int, device) -> float:
    return all_sums([value], world, device)[0]


def all_sums(values, world: int, device) -> list:
    """Each value summed over the ranks, in one collective."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- model and data

def resolve_configs(args):
    """(lm_cfg, vision_cfg, checkpoint path or None, LM state or None): from the flags, from
    --from_weight's metadata, or (LM only) from --from_lm's weights.

    Flags may not contradict a checkpoint's config, except those in STAGE_SETTINGS; the weights
    are loaded later, once the encoder has fixed the CLIP feature width.
    """
    lm_flags = {f.name: getattr(args, f.name) for f in fields(LMConfig) if getattr(args, f.name, None) is not None}
    vis_flags = {f.name: getattr(args, f.name) for f in fields(VisionConfig) if getattr(args, f.name, None) is not None}
    if vis_flags.get("frame_sampling") == "uniform":   # a checkpoint's fps rate does not carry over
        vis_flags.setdefault("sample_fps", 0.0)
    lm_state = None
    if args.from_lm:
        if args.from_weight:
            raise TrainingError("--from_lm and --from_weight both given: pick one")
        # A MiniMind .pth cannot tell its head count or RoPE base; the flags (or MiniMind2's values) do.
        lm_cfg, lm_state = read_lm(args.from_lm, num_heads=lm_flags.get("num_heads", 8),
                                   rope_theta=lm_flags.get("rope_theta", 1e6))
        clash = {k: (v, getattr(lm_cfg, k)) for k, v in lm_flags.items()
                 if k not in STAGE_SETTINGS and getattr(lm_cfg, k) != v}
        if clash:
            raise TrainingError(f"{args.from_lm}: flags contradict the LM's config (flag, weights): {clash}")
        for name in STAGE_SETTINGS & set(lm_flags):
            setattr(lm_cfg, name, lm_flags[name])
        vis_cfg, path = VisionConfig(**vis_flags), None
    elif args.from_weight:
        path = find_checkpoint(args.from_weight, args.out_dir)
        meta = read_metadata(path)
        lm_cfg = config_from_dict(LMConfig, json.loads(meta["lm_config"]))
        vis_cfg = config_from_dict(VisionConfig, json.loads(meta["vision_config"]))
        for cfg, flags in ((lm_cfg, lm_flags), (vis_cfg, vis_flags)):
            clash = {k: (v, getattr(cfg, k)) for k, v in flags.items()
                     if k not in STAGE_SETTINGS and getattr(cfg, k) != v}
            if clash:
                raise TrainingError(f"{path}: flags contradict the checkpoint's config "
                                    f"(flag, checkpoint): {clash}")
        for cfg, flags in ((lm_cfg, lm_flags), (vis_cfg, vis_flags)):
            for name in STAGE_SETTINGS & set(flags):
                setattr(cfg, name, flags[name])
    else:
        if "intermediate_size" not in lm_flags and "hidden_size" in lm_flags:
            # SwiGLU width ≈ 8/3 × hidden, rounded up to a multiple of 64 (MiniMind's rule: 512 → 1408).
            lm_flags["intermediate_size"] = 64 * math.ceil(lm_flags["hidden_size"] * 8 / 3 / 64)
        lm_cfg, vis_cfg, path = LMConfig(**lm_flags), VisionConfig(**vis_flags), None
    try:
        sampling_rate(vis_cfg)
    except ValueError as e:
        raise TrainingError(f"--frame_sampling/--sample_fps: {e}") from None
    return lm_cfg, vis_cfg, path, lm_state


def fit_lm_vocab(lm_cfg, lm_state, tokenizer, source):
    """Grow a loaded LM by the slot token load_tokenizer appended (MiniMind2's tokenizer has none)."""
    appended = [tokenizer.convert_ids_to_tokens(i) for i in range(lm_cfg.vocab_size, len(tokenizer))]
    if appended and lm_state is not None and set(appended) == {VISION_PAD}:
        return grow_vocab(lm_cfg, lm_state, len(tokenizer))
    if appended:
        hint = "use the tokenizer these weights were trained with" if source else f"pass --vocab_size {len(tokenizer)}"
        raise TrainingError(f"vocab_size {lm_cfg.vocab_size} < the tokenizer's {len(tokenizer)} tokens ({hint})")
    return lm_cfg, lm_state


def set_trainable(model, parts):
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise TrainingError(f"--train_parts: unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    for name in PARTS:
        getattr(model, name).requires_grad_(name in parts)


def open_trackers(args, run_name: str) -> list:
    """The trackers asked for; one that is not installed or cannot start says so in one line and is left out."""
    trackers = []
    for flag, package in (("wandb", "wandb"), ("swanlab", "swanlab")):
        if not getattr(args, flag):
            continue
        try:
            module = importlib.import_module(package)
        except ImportError:
            print(f"note: --{flag}: the {package} package is not installed (pip install {package}); "
                  f"logging to out/logs only", file=sys.stderr)
            continue
        try:
            module.init(project=args.tracker_project, **{"name" if flag == "wandb" else "experiment_name": run_name},
                        config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        except Exception as e:   # no network, no login, a refused key: the run goes on without it
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"note: --{flag}: could not start ({type(e).__name__}: {first_line}); logging to out/logs only",
                  file=sys.stderr)
            continue
        trackers.append(module)
    return trackers


def make_datasets(args, cfg: VisionConfig, chat, device, rank, fresh: bool):
    """Train/val datasets, and the frozen encoder if any media is missing from the feature cache.

    Fixes cfg.clip_dim from the encoder (or the cached features) for a fresh model.
    """
    data_dir = Path(args.media_root) if args.media_root else Path(args.data_path).parent
    cache = open_cache(data_dir, cfg, args.feature_dir)
    common = dict(chat=chat, num_frames=cfg.num_frames, max_len=args.max_len,
                  media_root=args.media_root, cache=cache, fps=sampling_rate(cfg))
    train = ConversationDataset(args.data_path, **common)
    if args.val_path:
        val = ConversationDataset(args.val_path, **common)
    else:   # a seeded hold-out from the training rows
        val = ConversationDataset(args.data_path, **common)
        order = np.random.default_rng(args.seed).permutation(len(train.rows))
        held = set(order[:min(args.val_samples, len(train.rows) // 10)].tolist())
        val.rows = [r for i, r in enumerate(train.rows) if i in held]
        train.rows = [r for i, r in enumerate(train.rows) if i not in held]
    keys = train.media_keys() | val.media_keys()
    missing = train.uncached() | val.uncached()
    encoder = None
    if missing:
        if rank == 0:
            print(f"{len(missing)} of {len(keys)} media not in the feature cache: CLIP runs online "
                  f"(scripts/extract_features.py makes a cache)", file=sys.stderr)
        encoder = FrameEncoder(cfg, device)
        train.preprocess = val.preprocess = encoder.pixels
    dim = encoder.dim if encoder else (cache.get(next(iter(keys))).shape[-1] if keys else cfg.clip_dim)
    if fresh:
        cfg.clip_dim = dim
    elif dim != cfg.clip_dim:
        raise TrainingError(f"the checkpoint expects {cfg.clip_dim}-d CLIP features, the encoder/cache gives {dim}")
    return train, val, encoder


def fit_feature_stats(model, dataset, encoder, seed, max_items=256):
    """Measure the CLIP feature statistics VideoSummary standardises with, on a seeded sample."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:max_items]
    media = [m for i in order for m in dataset[int(i)].get("media", [])]
    if not media:
        return
    frames, mask = frames_and_mask(media, encoder)
    model.summary.input_norm.fit(frames[mask])


class ShardSampler(Sampler):
    """This rank's share of an epoch, which can start part-way in (resume).

    The epoch's order is a permutation seeded by seed + epoch (reshuffled each epoch, the same on
    every rank), or 0..n-1 without shuffle. Rank r takes every world-th index from position r, so
    the k-th batches of all ranks together hold exactly the k-th global batch of world × batch_size
    a single process would take. When n does not divide by the world size the order is padded with
    PAD slots (no sample), not with repeated samples as DistributedSampler does: every rank gets as
    many batches (no rank waits alone in a collective) and no sample counts twice.

    With size_hints (one length per sample) batches of alike length are grouped on the global
    order, before it is dealt out, so DDP still sees exactly the single-process batches.
    """

    def __init__(self, size: int, world: int, rank: int, seed: int, shuffle=True, batch_size=1, size_hints=None):
        self.size, self.world, self.rank, self.seed, self.shuffle = size, world, rank, seed, shuffle
        self.global_batch, self.size_hints = batch_size * world, size_hints
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def share(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
            if self.size_hints is not None:
                order = group_by_length(order, self.size_hints, self.global_batch, g)
        else:
            order = list(range(self.size))
        order += [PAD] * (math.ceil(self.size / self.world) * self.world - self.size)
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.share()[self.skip:])

    def __len__(self):
        return max(0, math.ceil(self.size / self.world) - self.skip)


class Padded(Dataset):
    """The dataset, plus {"padding": True} for a PAD slot (collate drops it without counting it)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"padding": True} if i == PAD else self.data[i]


def group_by_length(order, size_hints, batch, generator, window_batches=64):
    """Sort each window of `window_batches` batches by length, cut it into batches, shuffle the batches.

    Padding a batch to its longest sample wastes compute when short and long samples mix; sorted
    windows keep each batch alike while the batch order stays random. Off by default: on
    templated data (like the demo's) alike length means alike question, and batches of one
    question type learn worse.
    """
    window = batch * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: size_hints[i], reverse=True)
        batches += [chunk[i:i + batch] for i in range(0, len(chunk), batch)]
    # The last (possibly short) batch stays last so every other batch is full.
    head, tail = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch else (batches, [])
    shuffled = [head[i] for i in torch.randperm(len(head), generator=generator).tolist()] + tail
    return [i for b in shuffled for i in b]


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
    # The fused kernel updates every tensor in one call: ~3x faster than the per-tensor loop on a
    # CPU too, which matters for small models whose step is short.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95),
                             fused=device.type in ("cuda", "cpu"))


def compile_blocks(lm):
    """torch.compile every transformer block in place (parameter names and checkpoints unchanged);
    dynamo's suppress_errors runs a block that fails to compile eagerly instead of stopping the run.
    On the demo's CPU shapes: ~45 s of compiling, then steps ~10% faster."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True
    for block in lm.layers:
        block.compile()


# ---------------------------------------------------------------- the loop

class Trainer:
    def __init__(self, args, stage: str):
        self.args, self.stage = args, stage
        if args.batch_size < 1 or args.accumulation_steps < 1:
            raise TrainingError("--batch_size and --accumulation_steps must be at least 1")
        self.rank, self.world, self.device = setup_distributed(args.device)
        seed_everything(args.seed)
        self.tokenizer = load_tokenizer(args.tokenizer)
        lm_cfg, vis_cfg, weight_path, lm_state = resolve_configs(args)
        self.source = str(weight_path or args.from_lm or "")
        lm_cfg, lm_state = fit_lm_vocab(lm_cfg, lm_state, self.tokenizer, self.source)
        vis_cfg.vision_token_id = self.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        chat = ChatEncoder(self.tokenizer, vis_cfg.num_visual_tokens)
        self.pad_id = chat.pad_id
        self.train_set, self.val_set, self.encoder = make_datasets(
            args, vis_cfg, chat, self.device, self.rank, fresh=weight_path is None)
        torch.manual_seed(args.seed)
        model = VideoLLM(lm_cfg, vis_cfg)
        self.base_sha256 = None
        if weight_path:
            load_weights(model, weight_path)
            if args.lora_rank:   # the adapter records exactly which base it fits
                self.base_sha256 = lora.file_sha256(weight_path)
        else:
            fit_feature_stats(model, self.train_set, self.encoder, args.seed)
        if lm_state is not None:
            load_into(model.lm, lm_state, args.from_lm)
        model.lm.grad_checkpointing = args.grad_checkpointing
        self.total_params = lora.parameter_count(model)
        self.peft = None
        if args.lora_rank or args.qlora:
            self.parts = self.wrap_lora(model, weight_path)
        else:
            pretrained = args.from_weight or args.from_lm
            default_parts = "summary,projector" if (stage == "pretrain" and pretrained) else ",".join(PARTS)
            self.parts = (args.train_parts or default_parts).split(",")
            set_trainable(model, self.parts)
        self.trainable_params = lora.parameter_count(model, trainable_only=True)
        self.model = model.to(self.device)
        if args.compile:
            compile_blocks(model.lm)
        self.ddp = wrap_ddp(model, self.device) if self.world > 1 else None
        self.optimizer = make_optimizer(model, args, self.device)
        dtype = autocast_dtype(args.dtype, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        # fp16 needs loss scaling (its range is too narrow for small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None
        workers = args.num_workers if args.num_workers >= 0 else (2 if self.encoder else 0)
        # The loaders draw their worker seeds from their own generators, not the global RNG, so the
        # global RNG (dropout) sees the same draws whether the run was resumed or not.
        self.sampler = ShardSampler(len(self.train_set), self.world, self.rank, args.seed, batch_size=args.batch_size,
                                    size_hints=self.train_set.size_hints() if args.group_by_length else None)
        self.loader_rng = torch.Generator()
        batches = partial(collate, pad_id=self.pad_id, warn_skipped=not args.strict)
        self.loader = DataLoader(Padded(self.train_set), batch_size=args.batch_size, sampler=self.sampler,
                                 collate_fn=batches, num_workers=workers, pin_memory=self.device.type == "cuda",
                                 generator=self.loader_rng)
        self.val_loader = DataLoader(Padded(self.val_set), batch_size=args.batch_size,
                                     sampler=ShardSampler(len(self.val_set), self.world, self.rank, args.seed,
                                                          shuffle=False),
                                     collate_fn=batches, num_workers=workers,
                                     generator=torch.Generator().manual_seed(args.seed))
        steps_per_epoch = math.ceil(len(self.loader) / args.accumulation_steps)
        self.total_steps = args.max_steps or args.epochs * steps_per_epoch
        name = args.save_name or f"{STAGE_PREFIX[stage]}_{model.lm_cfg.hidden_size}" + ("_lora" if self.peft else "")
        self.out_dir = Path(args.out_dir)
        # A LoRA run writes an adapter folder (peft format) beside its base, not a checkpoint file.
        self.ckpt_path = self.out_dir / (name if self.peft else f"{name}.safetensors")
        self.resume_path = self.out_dir / f"{name}.resume.pt"
        self.log_path = self.out_dir / "logs" / f"{name}.jsonl"
        self.metrics_path = self.out_dir / "logs" / f"{name}.metrics.json"
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.skipped, self.bad_steps, self.bad_in_a_row = 0, 0, 0
        if self.rank == 0:   # what a run killed mid-save left behind
            for path in (self.ckpt_path, self.resume_path, self.log_path, self.metrics_path):
                remove_stale_temps(path.parent, glob.escape(path.name))
        if args.resume:
            self.load_resume()
        elif self.rank == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
        self.trackers = open_trackers(args, name) if self.rank == 0 else []
        if self.rank == 0:
            print(f"trainable: {self.trainable_params:,} of the model's {self.total_params:,} weights "
                  f"({100 * self.trainable_params / self.total_params:.2f}%; parts: {','.join(self.parts)})")

    def wrap_lora(self, model, weight_path):
        """Adapters on the LM (+ --train_parts in full); returns the parts list recorded in the logs."""
        args = self.args
        if not weight_path:
            raise TrainingError("--lora_rank adapts a trained model: give its checkpoint with --from_weight")
        if not args.lora_rank:
            raise TrainingError("--qlora needs --lora_rank (the adapters are what trains)")
        full_parts = [p for p in (args.train_parts or "").split(",") if p]
        if args.qlora:
            lora.quantize_lm_4bit(model, self.device)
        targets = [t for t in args.lora_targets.split(",") if t]
        self.peft = lora.wrap(model, args.lora_rank, args.lora_alpha, args.lora_dropout, targets, full_parts)
        return [f"lora(r={args.lora_rank}:{'+'.join(targets)})", *full_parts]

    # -- state

    def run_settings(self) -> dict:
        return {"world_size": self.world, "batch_size": self.args.batch_size,
                "accumulation_steps": self.args.accumulation_steps, "seed": self.args.seed,
                "train_samples": len(self.train_set)}

    def read_resume_state(self) -> dict:
        if not self.resume_path.is_file():
            raise TrainingError(f"--resume: {self.resume_path} not found")
        try:
            state = load_torch_file(self.resume_path)   # weights_only: a resume file can run no code
        except CheckpointError as e:
            raise TrainingError(f"--resume: {e}") from None
        saved = state.get("run", {})
        now = self.run_settings()
        clash = {k: (now[k], saved.get(k)) for k in RESUME_KEYS if saved.get(k) != now[k]}
        if clash:
            raise TrainingError(f"--resume: {self.resume_path} was saved by a run with other settings "
                                f"(now, saved): {clash}")
        return state

    def load_resume(self):
        """Rank 0 reads the resume state and hands it to every rank (out_dir need not be shared between nodes)."""
        state, error = None, None
        if self.rank == 0:
            try:
                state = self.read_resume_state()
            except TrainingError as e:
                error = str(e)
        if self.world > 1:
            box = [state, error]
            dist.broadcast_object_list(box, src=0)
            state, error = box
        if error:
            raise TrainingError(error) if self.rank == 0 else PeerStopped()
        if self.peft:
            lora.load_adapter_state(self.peft, state["model"], self.resume_path)
        else:
            self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            if "scaler" not in state:
                raise TrainingError(f"--resume: {self.resume_path} was saved without fp16 loss scaling; "
                                    f"resume with the --dtype it was trained with")
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.skipped, self.bad_steps, self.bad_in_a_row = state["skipped"], state["bad_steps"], state["bad_in_a_row"]
        set_rng_state(state["rng"][self.rank])
        if self.rank == 0:   # drop log lines written after the saved step (and a line a kill cut short)
            kept = [line for line in read_log_lines(self.log_path) if json.loads(line)["step"] <= self.step]
            atomic_write(self.log_path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))

    def save(self):
        """Checkpoint (safetensors) and resume state, both atomic; rank 0 writes."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        info = dict(stage=self.stage, step=self.step, tokenizer=self.args.tokenizer,
                    parts=",".join(self.parts), source=self.source, data=self.args.data_path)
        if self.peft:
            lora.save_adapter(self.peft, self.ckpt_path, self.source, self.base_sha256, **info)
            model_state = lora.adapter_state(self.peft)   # the frozen base is reloaded from its checkpoint
        else:
            save_checkpoint(self.model, self.ckpt_path, **info)
            model_state = self.model.state_dict()
        state = {"model": model_state, "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "skipped": self.skipped, "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row,
                 "rng": rngs, "run": self.run_settings()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        atomic_write(self.resume_path, lambda tmp: torch.save(state, tmp))

    # -- data

    def micro_batches(self):
        """Endless stream of (epoch-tracked) micro-batches; stops when --epochs are used up."""
        while self.args.max_steps or self.epoch < self.args.epochs:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.batches_in_epoch * self.args.batch_size
            self.loader_rng.manual_seed(self.args.seed + self.epoch)
            for batch in self.loader:
                self.batches_in_epoch += 1
                yield batch
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def empty_batch(self):
        """A batch with no sample (one padding token, nothing to learn): a rank whose micro-batch
        was all bad or padding still runs DDP's forward and backward, with zero loss and gradient."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long)
        return {"input_ids": ids, "labels": torch.full_like(ids, -100), "media": [], "size": 0, "skipped": 0,
                "errors": []}

    def loss_sum(self, batch, training=True):
        """Summed token loss and token count of one micro-batch (in training, through DDP if any)."""
        frames, mask = frames_and_mask(batch["media"], self.encoder, self.device)
        net = (self.ddp if training else None) or self.model
        with self.autocast:
            loss, count = net(batch["input_ids"].to(self.device), batch["labels"].to(self.device), frames, mask)
        if frames is None and net is self.ddp:
            # DDP expects a gradient for every trainable parameter; a text-only batch gives the
            # vision side none, so it gets an explicit zero.
            loss = loss + 0.0 * sum(p.sum() for p in self.model.parameters() if p.requires_grad)
        return loss, count

    def stop_on_bad_samples(self, micro):
        """--strict: every rank stops together at a step where any rank met a bad sample."""
        errors = [e for b in micro for e in b["errors"]]
        if all_sum(len(errors), self.world, self.device):
            if errors:
                raise TrainingError(errors[0])
            raise PeerStopped()

    # -- steps

    def run(self):
        args = self.args
        model_params = [p for p in self.model.parameters() if p.requires_grad]
        stream = self.micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or args.no_progress,
                   desc=self.ckpt_path.stem, mininterval=1.0, dynamic_ncols=True)
        finished = False
        while self.step < self.total_steps and not finished:
            t0 = time.perf_counter()
            micro = list(islice(stream, args.accumulation_steps))
            if args.strict:
                self.stop_on_bad_samples(micro)
            # Summed over ranks, so every rank agrees: whether the data ran out (each rank has as
            # many batches, ShardSampler), samples skipped, the loss's denominator, tokens seen.
            ran_out, step_skipped, tokens, seen = all_sums(
                [len(micro) < args.accumulation_steps, sum(b["skipped"] for b in micro),
                 sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro if b["size"]),
                 sum(int(b["attention_mask"].sum()) for b in micro if b["size"])], self.world, self.device)
            finished = ran_out > 0
            self.skipped += int(step_skipped)
            if tokens == 0:   # nothing to learn from on any rank
                continue
            if self.ddp is None:
                micro = [b for b in micro if b["size"]]
            else:   # DDP pairs up each rank's forwards and backwards: every rank runs as many
                micro = [b if b["size"] else self.empty_batch() for b in micro]
            self.model.train()
            lr = lr_at(self.step, self.total_steps, args)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total_loss = 0.0
            for i, batch in enumerate(micro):
                last = i == len(micro) - 1
                sync = self.ddp.no_sync() if (self.ddp and not last) else nullcontext()
                with sync:
                    loss, _ = self.loss_sum(batch)
                    # Normalise by the global token count: every token weighs the same whatever
                    # the micro-batch or rank it landed on (DDP averages, so × world).
                    scaled = loss * self.world / tokens
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                total_loss += float(loss.detach())
            loss_value = all_sum(total_loss, self.world, self.device) / tokens
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model_params, args.grad_clip))
            # A non-finite gradient is normal while fp16 loss scaling finds its scale (the scaler
            # skips that update itself); otherwise it is a diverged step like a non-finite loss.
            if not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(grad_norm)):
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.update()
                self.bad_steps += 1
                self.bad_in_a_row += 1
                if self.rank == 0:
                    what = "loss" if not math.isfinite(loss_value) else "gradient"
                    print(f"warning: non-finite {what} after step {self.step}: update skipped "
                          f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)", file=sys.stderr, flush=True)
                if self.bad_in_a_row >= args.max_bad_steps:
                    raise TrainingError(f"loss or gradient was not finite for {self.bad_in_a_row} steps in a row "
                                        f"after step {self.step}; lower --learning_rate or check the data")
                continue
            self.bad_in_a_row = 0
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            seconds = time.perf_counter() - t0
            record = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                      "tok_s": round(seen / seconds, 1), "skipped": self.skipped, "bad_steps": self.bad_steps,
                      "grad_norm": round(grad_norm, 4), "epoch": self.epoch, "step_s": round(seconds, 4)}
            if args.val_every and self.step % args.val_every == 0:
                record["val_loss"] = self.validate()
            self.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / seconds:.0f}")
            if args.save_every and self.step % args.save_every == 0:
                self.save()
        bar.close()
        result = {"step": self.step, "skipped": self.skipped, "bad_steps": self.bad_steps,
                  "val_loss": self.validate(), "trainable_params": self.trainable_params,
                  "total_params": self.total_params}
        self.save()
        if self.rank == 0:
            atomic_write(self.metrics_path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
            print(f"saved {self.ckpt_path} (step {self.step}, val_loss {result['val_loss']:.4f}, "
                  f"skipped samples {self.skipped})")
            for tracker in self.trackers:
                tracker.finish()
        if self.world > 1:
            dist.barrier()   # no rank tears the group down while rank 0 is still writing
        return result

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        loss_total, tokens = 0.0, 0
        for batch in self.val_loader:
            if self.args.strict:
                self.stop_on_bad_samples([batch])
            if batch["size"]:   # no DDP here: ranks may run different numbers of forwards
                loss, count = self.loss_sum(batch, training=False)
                loss_total, tokens = loss_total + float(loss), tokens + int(count)
        loss_total, tokens = all_sums([loss_total, tokens], self.world, self.device)
        return round(loss_total / tokens, 6) if tokens else float("nan")

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            for tracker in self.trackers:
                tracker.log(dict(record), step=record["step"])


def read_log_lines(path) -> list:
    """The complete JSON lines of a run log (a last line cut short by a kill is dropped)."""
    if not Path(path).exists():
        return []
    lines = []
    for line in Path(path).read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        lines.append(line)
    return lines


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
