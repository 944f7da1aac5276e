"""The one training loop behind train_pretrain.py and train_sft.py: data, DDP, schedule, logs, checkpoints, resume."""
import argparse
from contextlib import nullcontext
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
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from dataset.features import open_cache
from dataset.vlm_dataset import ConversationDataset, collate, frames_and_mask
from model.chat import VISION_PAD, BadSample, ChatEncoder, TokenizerError, load_tokenizer
from dataset.media import SAMPLING_MODES, MediaError, sampling_rate
from model.checkpoint import CheckpointError, atomic_write, find_checkpoint, load_weights, read_metadata, save_checkpoint
from model.config import LMConfig, VisionConfig, config_from_dict
from model.convert import ConversionError, grow_vocab, load_into, read_lm
from model.vision import FrameEncoder, VisionWeightsError
from model.vlm import VideoLLM

STAGE_PREFIX = {"pretrain": "pretrain_vlm", "image": "sft_image", "video": "sft_video"}
PARTS = ("summary", "projector", "lm")
MAX_BAD_STEPS = 5   # non-finite losses in a row before the run stops
# Vision settings a stage may change when it starts --from_weight: which weights file holds the
# frozen tower, and how video frames are sampled (image stages never sample; the video stage
# decides, and its checkpoint records what it used, so eval samples the same way).
STAGE_SETTINGS = {"clip_pretrained", "frame_sampling", "sample_fps"}


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
    a("--seed", type=int, default=42)
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    a("--num_workers", type=int, default=-1, help="DataLoader workers (-1: 0 when features are cached, else 2)")
    a("--compile", action="store_true",
      help="torch.compile the LM's transformer blocks (on the demo's CPU shapes ~45 s of compiling buys ~10%% "
           "faster steps: not worth it there); a block that fails to compile runs eagerly")
    a("--strict", action="store_true", help="stop at the first unreadable sample instead of skipping it")
    a("--no_progress", action="store_true", help="no tqdm bar")
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
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def all_sum(value: float, world: int, device) -> float:
    if world == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


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
        clash = {k: (v, getattr(lm_cfg, k)) for k, v in lm_flags.items() if getattr(lm_cfg, k) != v}
        if clash:
            raise TrainingError(f"{args.from_lm}: flags contradict the LM's config (flag, weights): {clash}")
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
        for name in STAGE_SETTINGS & set(vis_flags):
            setattr(vis_cfg, name, vis_flags[name])
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


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also with one process) that can start part-way into an epoch."""

    def __init__(self, dataset, world, rank, seed):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        self.skip = 0

    def __iter__(self):
        return islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


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
        self.rank, self.world, self.device = setup_distributed(args.device)
        seed_everything(args.seed)
        self.tokenizer = load_tokenizer(args.tokenizer)
        lm_cfg, vis_cfg, weight_path, lm_state = resolve_configs(args)
        self.source = str(weight_path or args.from_lm or "")
        lm_cfg, lm_state = fit_lm_vocab(lm_cfg, lm_state, self.tokenizer, self.source)
        vis_cfg.vision_token_id = self.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        chat = ChatEncoder(self.tokenizer, vis_cfg.num_visual_tokens)
        self.train_set, self.val_set, self.encoder = make_datasets(
            args, vis_cfg, chat, self.device, self.rank, fresh=weight_path is None)
        torch.manual_seed(args.seed)
        model = VideoLLM(lm_cfg, vis_cfg)
        if weight_path:
            load_weights(model, weight_path)
        else:
            fit_feature_stats(model, self.train_set, self.encoder, args.seed)
        if lm_state is not None:
            load_into(model.lm, lm_state, args.from_lm)
        pretrained = args.from_weight or args.from_lm
        default_parts = "summary,projector" if (stage == "pretrain" and pretrained) else ",".join(PARTS)
        self.parts = (args.train_parts or default_parts).split(",")
        set_trainable(model, self.parts)
        self.model = model.to(self.device)
        if args.compile:
            compile_blocks(model.lm)
        self.ddp = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None) \
            if self.world > 1 else None
        self.optimizer = make_optimizer(model, args, self.device)
        self.sampler = ResumableSampler(self.train_set, self.world, self.rank, args.seed)
        workers = args.num_workers if args.num_workers >= 0 else (2 if self.encoder else 0)
        pad_id = chat.pad_id
        # Workers that outlive an epoch: no re-forking and refilling the prefetch queue every epoch.
        loading = dict(collate_fn=partial(collate, pad_id=pad_id), num_workers=workers,
                       pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.loader = DataLoader(self.train_set, batch_size=args.batch_size, sampler=self.sampler, **loading)
        self.val_loader = DataLoader(self.val_set, batch_size=args.batch_size,
                                     sampler=DistributedSampler(self.val_set, self.world, self.rank, shuffle=False),
                                     **loading)
        steps_per_epoch = math.ceil(len(self.loader) / args.accumulation_steps)
        self.total_steps = args.max_steps or args.epochs * steps_per_epoch
        name = args.save_name or f"{STAGE_PREFIX[stage]}_{model.lm_cfg.hidden_size}"
        self.out_dir = Path(args.out_dir)
        self.ckpt_path = self.out_dir / f"{name}.safetensors"
        self.resume_path = self.out_dir / f"{name}.resume.pt"
        self.log_path = self.out_dir / "logs" / f"{name}.jsonl"
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.skipped, self.bad_steps, self.bad_in_a_row = 0, 0, 0
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)
        if args.resume:
            self.load_resume()
        elif self.rank == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")

    # -- state

    def load_resume(self):
        if not self.resume_path.is_file():
            raise TrainingError(f"--resume: {self.resume_path} not found")
        state = torch.load(self.resume_path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.skipped, self.bad_steps = state["skipped"], state["bad_steps"]
        set_rng_state(state["rng"][self.rank] if isinstance(state["rng"], list) else state["rng"])
        if self.rank == 0:   # drop log lines written after the saved step
            lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))

    def save(self):
        """Checkpoint (safetensors) and resume state, both atomic; rank 0 writes."""
        rngs = [rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng_state())
        if self.rank != 0:
            return
        info = dict(stage=self.stage, step=self.step, tokenizer=self.args.tokenizer,
                    parts=",".join(self.parts), source=self.source)
        save_checkpoint(self.model, self.ckpt_path, **info)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                 "skipped": self.skipped, "bad_steps": self.bad_steps, "rng": rngs}
        atomic_write(self.resume_path, lambda tmp: torch.save(state, tmp))

    # -- data

    def micro_batches(self):
        """Endless stream of (epoch-tracked) micro-batches; stops when --epochs are used up."""
        while self.args.max_steps or self.epoch < self.args.epochs:
            self.sampler.set_epoch(self.epoch)
            self.sampler.skip = self.batches_in_epoch * self.args.batch_size
            for batch in self.loader:
                if self.args.strict and batch["errors"]:   # raised here, not in a loader worker
                    raise TrainingError(batch["errors"][0])
                self.batches_in_epoch += 1
                yield batch
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0

    def loss_sum(self, batch):
        """Summed token loss and token count of one micro-batch (model under DDP if any)."""
        frames, mask = frames_and_mask(batch["media"], self.encoder, self.device)
        net = self.ddp or self.model
        with self.autocast:
            loss, count = net(batch["input_ids"].to(self.device), batch["labels"].to(self.device), frames, mask)
        if frames is None and self.ddp is not None:
            # DDP expects a gradient for every trainable parameter; a text-only batch gives the
            # vision side none, so it gets an explicit zero.
            loss = loss + 0.0 * sum(p.sum() for p in self.model.parameters() if p.requires_grad)
        return loss, count

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
            finished = len(micro) < args.accumulation_steps
            micro = [b for b in micro if b["size"] > 0]
            step_skipped = all_sum(sum(b["skipped"] for b in micro), self.world, self.device) if micro else 0
            local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
            tokens = all_sum(local_tokens, self.world, self.device)   # the loss's denominator
            seen = all_sum(sum(int(b["attention_mask"].sum()) for b in micro), self.world, self.device)
            if tokens == 0:
                if finished:
                    break
                self.skipped += int(step_skipped)
                continue
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
                    (loss * self.world / tokens).backward()
                total_loss += float(loss.detach())
            loss_value = all_sum(total_loss, self.world, self.device) / tokens
            self.skipped += int(step_skipped)
            if not math.isfinite(loss_value):
                self.optimizer.zero_grad(set_to_none=True)
                self.bad_steps += 1
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= MAX_BAD_STEPS:
                    raise TrainingError(f"loss was not finite for {MAX_BAD_STEPS} steps in a row at step "
                                        f"{self.step}; lower --learning_rate or check the data")
                continue
            self.bad_in_a_row = 0
            grad_norm = torch.nn.utils.clip_grad_norm_(model_params, args.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            seconds = time.perf_counter() - t0
            record = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                      "tok_s": round(seen / seconds, 1), "skipped": self.skipped,
                      "grad_norm": round(float(grad_norm), 4), "epoch": self.epoch, "step_s": round(seconds, 4)}
            if args.val_every and self.step % args.val_every == 0:
                record["val_loss"] = self.validate()
            self.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / seconds:.0f}")
            if args.save_every and self.step % args.save_every == 0:
                self.save()
        bar.close()
        result = {"step": self.step, "skipped": self.skipped, "bad_steps": self.bad_steps,
                  "val_loss": self.validate()}
        self.save()
        if self.rank == 0:
            atomic_write(self.out_dir / "logs" / f"{self.ckpt_path.stem}.metrics.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
            print(f"saved {self.ckpt_path} (step {self.step}, val_loss {result['val_loss']:.4f}, "
                  f"skipped samples {self.skipped})")
        if self.world > 1:
            dist.barrier()   # no rank tears the group down while rank 0 is still writing
        return result

    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        loss_total, tokens = 0.0, 0
        for batch in self.val_loader:
            if batch["size"]:
                loss, count = self.loss_sum(batch)
                loss_total, tokens = loss_total + float(loss), tokens + int(count)
        loss_total, tokens = all_sum(loss_total, self.world, self.device), all_sum(tokens, self.world, self.device)
        return round(loss_total / tokens, 6) if tokens else float("nan")

    def log(self, record):
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")


def main(stages, lr: float, epochs: int, batch_size: int):
    """Entry point for the thin train_*.py scripts: bad input ends in one line, not a traceback."""
    parser = build_parser("/".join(stages), lr, epochs, batch_size)
    if len(stages) > 1:
        parser.add_argument("--stage", required=True, choices=stages)
    args = parser.parse_args()
    try:
        Trainer(args, getattr(args, "stage", stages[0])).run()
    except (TrainingError, CheckpointError, ConversionError, TokenizerError, BadSample, MediaError,
            VisionWeightsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
