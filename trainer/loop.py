"""The training loop: a Trainer built from the flags steps, validates, logs and saves one run."""
from contextlib import nullcontext
import glob
import json
import math
import sys
import time
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.packing import packing_inputs
from dataset.vlm_dataset import collate, visual_inputs
from model.chat import ChatEncoder, load_tokenizer
from model.atomic import atomic_write, remove_stale_temps
from model.checkpoint import load_weights, save_checkpoint
from model.convert import load_into
from model import lora
from model.vlm import VideoLLM
from trainer.config import fit_lm_vocab, resolve_configs
from trainer.data import fit_feature_stats, make_datasets
from trainer.distributed import all_sum, all_sums, setup_distributed, wrap_ddp
from trainer.errors import PeerStopped, TrainingError
from trainer.optim import autocast_dtype, compile_blocks, lr_at, make_optimizer
from trainer.parts import choose_parts, set_trainable, wrap_lora
from trainer.sampler import Padded, ShardSampler
from trainer.state import (COUNTERS, all_rng_states, restore_optimizer, seed_everything, set_rng_state,
                           share_resume_state, trim_log, write_resume_state)
from trainer.trackers import open_trackers

STAGE_PREFIX = {"pretrain": "pretrain_vlm", "image": "sft_image", "video": "sft_video"}


class Trainer:
    """One run: built from the flags (configs, data, model, update, loaders, outputs, resume), stepped by run()."""

    def __init__(self, args, stage: str):
        self.args, self.stage = args, stage
        if args.batch_size < 1 or args.accumulation_steps < 1:
            raise TrainingError("--batch_size and --accumulation_steps must be at least 1")
        self.rank, self.world, self.device = setup_distributed(args.device)
        seed_everything(args.seed)
        self.tokenizer = load_tokenizer(args.tokenizer)
        lm_cfg, vis_cfg, weight_path, lm_state = self.read_configs()
        chat = ChatEncoder(self.tokenizer, vis_cfg.num_visual_tokens)
        self.pad_id = chat.pad_id
        self.train_set, self.val_set, self.encoder = make_datasets(
            args, vis_cfg, chat, self.device, self.rank, fresh=weight_path is None)
        self.build_model(lm_cfg, vis_cfg, weight_path, lm_state)
        self.build_update()
        self.build_loaders()
        self.name_outputs()
        self.start_or_resume()
        self.trackers = open_trackers(args, self.name) if self.rank == 0 else []
        if self.rank == 0:
            print(f"trainable: {self.trainable_params:,} of the model's {self.total_params:,} weights "
                  f"({100 * self.trainable_params / self.total_params:.2f}%; parts: {','.join(self.parts)})")

    # -- building

    def read_configs(self):
        """(lm_cfg, vis_cfg, checkpoint path or None, LM state or None), fitted to the tokenizer; sets self.source."""
        lm_cfg, vis_cfg, weight_path, lm_state = resolve_configs(self.args)
        self.source = str(weight_path or self.args.from_lm or "")
        lm_cfg, lm_state = fit_lm_vocab(lm_cfg, lm_state, self.tokenizer, self.source)
        vis_cfg.vision_token_id = self.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
        return lm_cfg, vis_cfg, weight_path, lm_state

    def build_model(self, lm_cfg, vis_cfg, weight_path, lm_state):
        """The model with its weights loaded and its trainable parts chosen, on the device."""
        args = self.args
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
            self.peft, self.parts = wrap_lora(model, args, weight_path, self.device)
        else:
            self.parts = choose_parts(args, self.stage)
            set_trainable(model, self.parts)
        self.trainable_params = lora.parameter_count(model, trainable_only=True)
        self.model = model.to(self.device)
        if args.compile:
            compile_blocks(model.lm)

    def build_update(self):
        """What updates the weights: DDP (several ranks), AdamW, autocast, and for fp16 a loss scaler."""
        self.ddp = wrap_ddp(self.model, self.device) if self.world > 1 else None
        self.optimizer = make_optimizer(self.model, self.args, self.device)
        # The weights AdamW updates, and so the ones clipping covers.
        self.updated = [p for p in self.model.parameters() if p.requires_grad]
        dtype = autocast_dtype(self.args.dtype, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        # fp16 needs loss scaling (its range is too narrow for small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None

    def build_loaders(self):
        """This rank's training and validation loaders, and the step count they give."""
        args = self.args
        workers = args.num_workers if args.num_workers >= 0 else (2 if self.encoder else 0)
        # The loaders draw their worker seeds from their own generators, not the global RNG, so the
        # global RNG (dropout) sees the same draws whether the run was resumed or not.
        self.sampler = ShardSampler(len(self.train_set), self.world, self.rank, args.seed, batch_size=args.batch_size,
                                    size_hints=self.train_set.size_hints() if args.group_by_length else None)
        self.loader_rng = torch.Generator()
        batches = partial(collate, pad_id=self.pad_id, warn_skipped=not args.strict, pack=args.pack)
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

    def name_outputs(self):
        """The run's name and the paths of its checkpoint, resume state, log and metrics."""
        args = self.args
        name = args.save_name or f"{STAGE_PREFIX[self.stage]}_{self.model.lm_cfg.hidden_size}" + (
            "_lora" if self.peft else "")
        self.name, self.out_dir = name, Path(args.out_dir)
        # A LoRA run writes an adapter folder (peft format) beside its base, not a checkpoint file.
        self.ckpt_path = self.out_dir / (name if self.peft else f"{name}.safetensors")
        self.resume_path = self.out_dir / f"{name}.resume.pt"
        self.log_path = self.out_dir / "logs" / f"{name}.jsonl"
        self.metrics_path = self.out_dir / "logs" / f"{name}.metrics.json"

    def start_or_resume(self):
        """Counters at zero and a fresh log, or all of it from the resume state (--resume)."""
        self.step, self.epoch, self.batches_in_epoch = 0, 0, 0
        self.skipped, self.bad_steps, self.bad_in_a_row = 0, 0, 0
        if self.rank == 0:   # what a run killed mid-save left behind
            for path in (self.ckpt_path, self.resume_path, self.log_path, self.metrics_path):
                remove_stale_temps(path.parent, glob.escape(path.name))
        if self.args.resume:
            self.load_resume()
        elif self.rank == 0:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")

    # -- state

    def run_settings(self) -> dict:
        return {"world_size": self.world, "batch_size": self.args.batch_size,
                "accumulation_steps": self.args.accumulation_steps, "seed": self.args.seed,
                "train_samples": len(self.train_set), "pack": self.args.pack}

    def load_resume(self):
        """Weights, optimizer, counters and this rank's RNG state from the resume state; the log cut to its step."""
        state = share_resume_state(self.resume_path, self.run_settings(), self.rank, self.world)
        if self.peft:
            lora.load_adapter_state(self.peft, state["model"], self.resume_path)
        else:
            self.model.load_state_dict(state["model"])
        restore_optimizer(state, self.optimizer, self.scaler, self.resume_path)
        for name in COUNTERS:
            setattr(self, name, state[name])
        set_rng_state(state["rng"][self.rank])
        if self.rank == 0:
            trim_log(self.log_path, self.step)

    def save(self):
        """Checkpoint (safetensors) and resume state, both atomic; rank 0 writes."""
        rngs = all_rng_states(self.world)
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
        counters = {name: getattr(self, name) for name in COUNTERS}
        write_resume_state(self.resume_path, model_state, self.optimizer, self.scaler, counters, rngs,
                           self.run_settings())

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
        visual = visual_inputs(batch["media"], self.encoder, self.device)
        net = (self.ddp if training else None) or self.model
        packing = packing_inputs(batch, self.device)
        with self.autocast:
            loss, count = net(batch["input_ids"].to(self.device), batch["labels"].to(self.device), *visual, **packing)
        if visual.features is None and net is self.ddp:
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
        """Step to the end (--max_steps, or --epochs), then validate, save and write the metrics; returns them."""
        stream = self.micro_batches()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or self.args.no_progress,
                   desc=self.ckpt_path.stem, mininterval=1.0, dynamic_ncols=True)
        finished = False
        while self.step < self.total_steps and not finished:
            # -- 1. take the step's micro-batches; every rank agrees on their token counts
            t0 = time.perf_counter()
            micro, tokens, seen, slots, finished = self.gather_step(stream)
            if tokens == 0:   # nothing to learn from on any rank
                continue
            # -- 2. forward/backward through each micro-batch at this step's learning rate
            lr = self.set_learning_rate()
            loss_value = self.forward_backward(micro, tokens)
            # -- 3. clip, check, update
            grad_norm = self.clip_gradients()
            # A non-finite gradient is normal while fp16 loss scaling finds its scale (the scaler
            # skips that update itself); otherwise it is a diverged step like a non-finite loss.
            if not math.isfinite(loss_value) or (self.scaler is None and not math.isfinite(grad_norm)):
                self.skip_bad_step(loss_value)
                continue
            self.apply_update()
            # -- 4. log, validate, save
            self.log_step(loss_value, lr, grad_norm, seen, slots, time.perf_counter() - t0, bar)
            if self.args.save_every and self.step % self.args.save_every == 0:
                self.save()
        bar.close()
        return self.finish()

    def gather_step(self, stream):
        """(micro-batches, tokens to learn from, tokens seen, token slots the batches hold (seen + padding),
        whether the data ran out), summed over ranks."""
        args = self.args
        micro = list(islice(stream, args.accumulation_steps))
        if args.strict:
            self.stop_on_bad_samples(micro)
        # Summed over ranks, so every rank agrees: whether the data ran out (each rank has as
        # many batches, ShardSampler), samples skipped, the loss's denominator, tokens seen.
        ran_out, step_skipped, tokens, seen, slots = all_sums(
            [len(micro) < args.accumulation_steps, sum(b["skipped"] for b in micro),
             sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro if b["size"]),
             sum(int(b["attention_mask"].sum()) for b in micro if b["size"]),
             sum(b["input_ids"].numel() for b in micro if b["size"])], self.world, self.device)
        self.skipped += int(step_skipped)
        return micro, tokens, seen, slots, ran_out > 0

    def set_learning_rate(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def forward_backward(self, micro, tokens) -> float:
        """Gradients of the step's loss (synced by DDP at the last micro-batch); returns the mean token loss."""
        if self.ddp is None:
            micro = [b for b in micro if b["size"]]
        else:   # DDP pairs up each rank's forwards and backwards: every rank runs as many
            micro = [b if b["size"] else self.empty_batch() for b in micro]
        self.model.train()
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
        return all_sum(total_loss, self.world, self.device) / tokens

    def clip_gradients(self) -> float:
        """Clip to --grad_clip; returns the norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return float(torch.nn.utils.clip_grad_norm_(self.updated, self.args.grad_clip))

    def skip_bad_step(self, loss_value):
        """Drop a diverged step's gradients and count it; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        self.bad_steps += 1
        self.bad_in_a_row += 1
        if self.rank == 0:
            what = "loss" if not math.isfinite(loss_value) else "gradient"
            print(f"warning: non-finite {what} after step {self.step}: update skipped "
                  f"({self.bad_in_a_row} in a row, {self.bad_steps} in all)", file=sys.stderr, flush=True)
        if self.bad_in_a_row >= self.args.max_bad_steps:
            raise TrainingError(f"loss or gradient was not finite for {self.bad_in_a_row} steps in a row "
                                f"after step {self.step}; lower --learning_rate or check the data")

    def apply_update(self):
        self.bad_in_a_row = 0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def log_step(self, loss_value, lr, grad_norm, seen, slots, seconds, bar):
        """The step's log record (with val_loss every --val_every steps), to the log, trackers and bar."""
        record = {"step": self.step, "loss": round(loss_value, 6), "lr": lr,
                  "tok_s": round(seen / seconds, 1), "pad_share": round(1 - seen / slots, 4),
                  "skipped": self.skipped, "bad_steps": self.bad_steps,
                  "grad_norm": round(grad_norm, 4), "epoch": self.epoch, "step_s": round(seconds, 4)}
        if self.args.val_every and self.step % self.args.val_every == 0:
            record["val_loss"] = self.validate()
        self.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{seen / seconds:.0f}")

    def finish(self) -> dict:
        """Final validation, checkpoint and metrics file; returns the metrics."""
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
