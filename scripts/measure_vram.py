"""Peak GPU memory of a training step at each batch size, for the README's VRAM table (CUDA; --estimate on a CPU).

It builds the model at a preset size (26m: hidden 512 × 8 layers, 104m: 768 × 16), feeds it random
token ids and random per-frame features of the shape the feature cache holds, and runs a few
optimizer steps (AdamW, --dtype autocast, optional --grad_checkpointing) per batch size, reporting
torch.cuda.max_memory_allocated / max_memory_reserved. --encoder adds the frozen CLIP tower run on
random frames, as training without a feature cache does.

    python scripts/measure_vram.py --preset 26m --batch_sizes 1 2 4 8 16 32
    python scripts/measure_vram.py --preset 104m --grad_checkpointing --encoder ViT-B-16
    python scripts/measure_vram.py --preset 26m --estimate        # no GPU: count the bytes instead

--estimate adds up what a step must hold at its peak: fp32 weights, their gradients and AdamW's two
moments, plus every tensor autograd keeps for the backward pass under bf16 autocast (each storage
once, parameters not twice). It leaves out the CUDA context, allocator slack and kernel workspaces
(a few hundred MB in practice), so a measured peak will be somewhat higher.
"""
import argparse
import sys
from types import SimpleNamespace

import torch

import _repo  # noqa: F401  (puts the repository root on sys.path)
from model.config import LMConfig, VisionConfig
from model.vlm import VideoLLM
from trainer.optim import make_optimizer

PRESETS = {"26m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1408),
           "104m": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2, intermediate_size=2048)}


def build(preset: str, vocab_size: int, clip_dim: int, num_frames: int, num_visual_tokens: int, device):
    lm_cfg = LMConfig(vocab_size=vocab_size, **PRESETS[preset])
    vis_cfg = VisionConfig(clip_dim=clip_dim, num_frames=num_frames, num_visual_tokens=num_visual_tokens,
                           vision_token_id=vocab_size - 1)
    return VideoLLM(lm_cfg, vis_cfg).to(device)


def random_batch(model: VideoLLM, batch_size: int, seq_len: int, device, generator=None):
    """One video per sample: its K slots open the sequence, the rest is text with every token labelled."""
    vis = model.vision_cfg
    ids = torch.randint(0, model.lm_cfg.vocab_size - 1, (batch_size, seq_len), generator=generator)
    ids[:, :vis.num_visual_tokens] = vis.vision_token_id
    labels = ids.clone()
    labels[:, :vis.num_visual_tokens] = -100
    frames = torch.randn(batch_size, vis.num_frames, vis.clip_dim, generator=generator)
    mask = torch.ones(batch_size, vis.num_frames, dtype=torch.bool)
    return ids.to(device), labels.to(device), frames.to(device), mask.to(device)


def train_step(model, optimizer, batch, autocast, encoder=None, image_size=224):
    """Forward, backward and update as the trainer does them; returns the mean token loss."""
    ids, labels, frames, mask = batch
    if encoder is not None:   # the frozen tower on random frames, its features replacing the cached ones
        n, t = frames.shape[:2]
        pixels = torch.randn(n * t, 3, image_size, image_size, device=frames.device)
        with torch.no_grad(), autocast:
            frames = encoder(pixels).float().view(n, t, -1)
    with autocast:
        loss_sum, count = model(ids, labels, frames, mask)
    loss = loss_sum / count
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def estimate(args):
    """The --estimate table: bytes of weights, gradients, AdamW moments and saved activations, on a CPU.
    → [(batch size, state bytes, activation bytes)]."""
    rows = []
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    print("| preset | batch size | weights + grads + AdamW (GiB) | saved activations (GiB) | estimated peak (GiB) |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        model = build(args.preset, args.vocab_size, args.clip_dim, args.num_frames, args.num_visual_tokens, "cpu")
        model.lm.grad_checkpointing = args.grad_checkpointing
        model.train()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        states = weights + 3 * trainable   # + fp32 gradients and AdamW's exp_avg, exp_avg_sq
        param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in param_storages:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        ids, labels, frames, mask = random_batch(model, batch_size, args.seq_len, "cpu")
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(ids, labels, frames, mask)
        activations = sum(saved.values())
        rows.append((batch_size, states, activations))
        gib = 2 ** 30
        print(f"| {args.preset} | {batch_size} | {states / gib:.2f} | {activations / gib:.2f} | "
              f"{(states + activations) / gib:.2f} |", flush=True)
        del model
    print(f"\n{args.preset}: estimated on a CPU (no CUDA context or allocator slack), seq_len {args.seq_len}, "
          f"{args.num_frames} frames, {args.dtype}{', gradient checkpointing' if args.grad_checkpointing else ''}, cached features")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="26m")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sample (the trainer's --max_len)")
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--num_visual_tokens", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=6400)
    p.add_argument("--clip_dim", type=int, default=384, help="cached feature width (ViT-S-32: 384, ViT-B-16: 512)")
    p.add_argument("--encoder", default=None,
                   help="also run this open_clip tower (random weights) on the frames, as training without a cache does")
    p.add_argument("--image_size", type=int, default=224, help="the --encoder's input size")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per batch size (the first allocates AdamW's state)")
    p.add_argument("--estimate", action="store_true", help="no GPU needed: count weight, optimizer and saved-activation bytes")
    args = p.parse_args()
    if args.estimate:
        estimate(args)
        return
    if not torch.cuda.is_available():
        sys.exit("error: measuring VRAM needs a CUDA device; none is visible here")
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype is not None)
    encoder = None
    if args.encoder:
        from model.vision import create_clip
        clip, _ = create_clip(args.encoder, args.image_size)
        encoder = clip.visual.eval().requires_grad_(False).to(device)
        args.clip_dim = int(encoder.output_dim)
    print("| preset | batch size | peak allocated (GiB) | peak reserved (GiB) | loss |")
    print("|---|---|---|---|---|")
    params = 0
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        model = build(args.preset, args.vocab_size, args.clip_dim, args.num_frames, args.num_visual_tokens, device)
        model.lm.grad_checkpointing = args.grad_checkpointing
        model.train()
        params = sum(p.numel() for p in model.parameters())
        optimizer = make_optimizer(model, SimpleNamespace(weight_decay=0.1, learning_rate=1e-4), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(args.steps):
                loss = train_step(model, optimizer, random_batch(model, batch_size, args.seq_len, device),
                                  autocast, encoder, args.image_size)
            torch.cuda.synchronize()
            allocated = torch.cuda.max_memory_allocated() / 2**30
            reserved = torch.cuda.max_memory_reserved() / 2**30
            print(f"| {args.preset} | {batch_size} | {allocated:.2f} | {reserved:.2f} | {loss:.2f} |", flush=True)
        except torch.cuda.OutOfMemoryError:
            print(f"| {args.preset} | {batch_size} | out of memory | | |", flush=True)
        del model, optimizer
    print(f"\n{args.preset}: {params / 1e6:.1f}M trainable parameters, seq_len {args.seq_len}, {args.num_frames} frames, "
          f"{args.dtype}{', gradient checkpointing' if args.grad_checkpointing else ''}"
          f"{f', online {args.encoder} tower' if args.encoder else ', cached features'}; {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
