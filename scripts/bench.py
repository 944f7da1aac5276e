"""Speed side by side on this machine: our LM, generation, frame reading and the feature cache against
the obvious alternatives, measured in one run as ratios (ours ÷ theirs in speed: higher is better);
prints a table and writes out/bench.json.

    python scripts/bench.py                      # every CPU section (~24 min on 2 cores); CUDA section when a GPU is present
    python scripts/bench.py --only lm,decode     # some sections (merged into an existing out/bench.json)
    python scripts/bench.py --only data          # a 1M-row annotation file: memory and time to open and read it (~5 min)
    python scripts/bench.py --only serve         # the OpenAI server: 8 clients batched vs one at a time, memory under load (~1 min)
    python scripts/bench.py --run_demo           # also run scripts/demo.sh (~8 min) for demo_wall_s / demo_peak_rss_gb

Ours and theirs alternate (A B, B A, ...) and ratios are medians of per-round ratios, so a shared,
noisy machine slows both sides alike. Absolute times on a CPU are not comparable between runs.
"""
import os

# Sleeping (not spinning) OpenMP threads: a spinning one stalls whenever the other core is busy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import base64
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from _repo import ROOT
from dataset.media import read_video, uniform_indices
from model.config import LMConfig, VisionConfig
from model.convert import HF_NAMES, hf_config, rename_out
from dataset.vlm_dataset import VisualInputs
from model.engine import SamplingOptions, generate_tokens
from model.vlm import VideoLLM
from trainer.optim import make_optimizer

SECTIONS = ("lm", "sft", "decode", "eval", "frames", "cache", "data", "serve", "demo", "gpu")
# LM shapes (heads, KV heads and vocabulary as MiniMind2); SwiGLU width by the trainer's rule.
SHAPES = {
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, vocab_size=1024),  # the demo LM's width, 4 layers
    "26M": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, vocab_size=6400),    # MiniMind2-small
    "104M": dict(hidden_size=768, num_layers=16, num_heads=8, num_kv_heads=2, vocab_size=6400),  # MiniMind2
}
# Goals: (key, comparison, target).
GOALS = [("train_vs_hf", ">=", 1.3), ("sft_epoch_vs_hf_padded", ">=", 1.5), ("decode_vs_hf", ">=", 2.0),
         ("decode_vs_hf_26M", ">=", 1.3), ("frames_vs_decode_all", ">=", 10.0),
         ("cached_vs_online", ">=", 10.0), ("serve_batched_vs_sequential", ">=", 3.0),
         ("serve_batched_vs_sequential_text", ">=", 3.0), ("serve_rss_ratio", "<=", 1.5),
         ("data_rss_mb_per_1m_rows", "<=", 150.0), ("data_worker_growth_mb", "<=", 50.0),
         ("data_worker_private_growth_mb", "<=", 50.0), ("demo_wall_s", "<=", 600.0), ("demo_peak_rss_gb", "<=", 4.0),
         ("gpu_mfu_104M", ">=", 0.35)]
# Dense bf16 peak of known GPUs (FLOP/s, from their data sheets); others use a measured matmul peak.
GPU_PEAKS = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
             "H200": 989e12, "A100": 312e12}
SFT_LABELLED = 0.12   # share of a row that is the answer in the SFT-shaped batch (make_synthetic's video SFT: 12 %)
BENCH = ROOT / "out" / "bench"


class BenchError(Exception):
    """A benchmark that cannot run as asked; one line."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring

def alternate(candidates: dict, rounds: int, warmup: int = 1, cpu_times: dict = None) -> dict:
    """Run every candidate once per round, in turn, the order reversed every other round (A B, B A,
    ...: neither side always runs first), after warm-up rounds → {name: [seconds]}.

    cpu_times, if given, collects each run's process CPU seconds too: with one thread they leave
    out the time other processes held the core.
    """
    for _ in range(warmup):
        for run in candidates.values():
            run()
    times = {name: [] for name in candidates}
    for round_ in range(rounds):
        order = list(candidates.items())
        for name, run in (order if round_ % 2 == 0 else order[::-1]):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def speed_ratio(ours: list, theirs: list) -> float:
    """How many times faster ours is: the median over rounds of their time ÷ ours."""
    return round(statistics.median(t / o for o, t in zip(ours, theirs)), 3)


def median(times: list) -> float:
    return statistics.median(times)


def matmul_peak(device, dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's large-matmul FLOP/s right now: the best of a few n×n products."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------- the two language models

def lm_config(shape: str) -> LMConfig:
    s = SHAPES[shape]
    return LMConfig(**s, intermediate_size=64 * math.ceil(s["hidden_size"] * 8 / 3 / 64))


def our_model(shape: str, device, lively=False) -> VideoLLM:
    """Our video LLM whose LM has this shape (its vision parts stay idle: text-only batches).

    lively: weights at 1/sqrt(fan-in) instead of 0.02, so greedy decoding produces varied tokens
    with clear margins (the side-by-side checks compare tokens).
    """
    torch.manual_seed(0)
    cfg = lm_config(shape)
    model = VideoLLM(cfg, VisionConfig(clip_dim=64, summary_dim=64, vision_token_id=cfg.vocab_size - 1))
    if lively:
        with torch.no_grad():
            for p in model.lm.parameters():
                if p.ndim >= 2:
                    p.normal_(0, p.shape[1] ** -0.5)
    model.summary.requires_grad_(False)
    model.projector.requires_grad_(False)
    return model.to(device)


def hf_twin(model: VideoLLM, device, folder: Path):
    """transformers' LlamaForCausalLM with the same weights, written as an exported folder
    (model/convert.py's names and config) and loaded back with from_pretrained (SDPA attention)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().clone() for k, v in rename_out(model.lm.state_dict(), HF_NAMES).items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(model.lm_cfg, bos_id=1, eos_id=2, pad_id=0)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    hf = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", dtype=torch.float32)
    hf.generation_config.eos_token_id = None   # both sides decode exactly the asked number of tokens
    return hf.to(device)


def text_batch(cfg: LMConfig, batch: int, seq_len: int, labelled: float, device):
    """Random ids (never the visual slot) and labels on the last `labelled` share of every row."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, cfg.vocab_size - 1, (batch, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, :seq_len - max(2, round(seq_len * labelled))] = -100
    return ids.to(device), labels.to(device)


def flops_per_token(cfg: LMConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's convention: 6 × matmul weights (tied head included) + 12 × layers × width × context."""
    d, h = cfg.hidden_size, cfg.intermediate_size
    kv = d // cfg.num_heads * cfg.num_kv_heads
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * h
    return 6 * (cfg.num_layers * per_layer + cfg.vocab_size * d) + 12 * cfg.num_layers * d * seq_len


def bench_train(shape, batch, seq_len, labelled, rounds, device, workdir, autocast_dtype=None, compile_ours=False):
    """One optimizer step (forward, backward, AdamW as the trainer builds it), ours vs transformers.

    compile_ours: our blocks through torch.compile (the trainer's --compile); theirs stay eager.
    """
    ours = our_model(shape, device).train()
    hf = hf_twin(ours, device, workdir / f"hf_{shape}").train()
    if compile_ours:
        from trainer.optim import compile_blocks
        compile_blocks(ours.lm)
    cfg = ours.lm_cfg
    ids, labels = text_batch(cfg, batch, seq_len, labelled, device)
    opt_args = SimpleNamespace(learning_rate=1e-4, weight_decay=0.1)
    our_opt, hf_opt = make_optimizer(ours, opt_args, device), make_optimizer(hf, opt_args, device)
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def our_loss():
        with autocast:
            loss_sum, count = ours(ids, labels)
        return loss_sum / count

    def hf_loss():
        with autocast:
            return hf(input_ids=ids, labels=labels).loss

    with torch.no_grad():   # same weights, same batch: the same loss before any step
        gap = abs(float(our_loss()) - float(hf_loss()))

    def step(loss_fn, opt):
        def run():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    cpu_times = {}
    times = alternate({"ours": step(our_loss, our_opt), "hf": step(hf_loss, hf_opt)}, rounds, cpu_times=cpu_times)
    tokens = batch * seq_len
    return {"shape": shape, "batch": batch, "seq_len": seq_len, "labelled_share": labelled, "rounds": rounds,
            "ours_tok_s": round(tokens / median(times["ours"]), 1), "hf_tok_s": round(tokens / median(times["hf"]), 1),
            "ratio": speed_ratio(times["ours"], times["hf"]), "cpu_time_ratio": speed_ratio(cpu_times["ours"], cpu_times["hf"]),
            "initial_loss_gap": round(gap, 6),
            "flops_per_token": flops_per_token(cfg, seq_len)}


def bench_sft_epoch(samples, shape, batch, rounds, device, workdir):
    """One SFT epoch over `samples`: ours with packed batches vs LlamaForCausalLM with transformers' padding
    collator (scripts/bench_sft.py); the same batches, AdamW as the trainer builds it."""
    from bench_sft import epoch_batches, first_batch_loss_gap, hf_collator, hf_epoch, our_epoch
    ours = our_model(shape, device).train()
    hf = hf_twin(ours, device, workdir / f"hf_sft_{shape}").train()
    batches, collator = epoch_batches(samples, batch), hf_collator()
    gap = first_batch_loss_gap(ours, hf, batches, collator, device)
    opt_args = SimpleNamespace(learning_rate=1e-4, weight_decay=0.1)
    our_opt, hf_opt = make_optimizer(ours, opt_args, device), make_optimizer(hf, opt_args, device)
    epochs = {"ours": [], "hf": []}
    runs = {"ours": lambda: epochs["ours"].append(our_epoch(ours, our_opt, batches, device)),
            "hf": lambda: epochs["hf"].append(hf_epoch(hf, hf_opt, batches, collator, device))}
    times = alternate(runs, rounds)
    last = {side: runs_[-1] for side, runs_ in epochs.items()}
    tokens = last["ours"]["tokens"]
    return {"shape": shape, "samples": len(samples), "batch": batch, "rounds": rounds,
            "mean_sample_tokens": round(tokens / len(samples), 1),
            "padding_share_ours": round(1 - tokens / last["ours"]["slots"], 4),
            "padding_share_hf": round(1 - tokens / last["hf"]["slots"], 4),
            "ours_epoch_s": round(median(times["ours"]), 3), "hf_epoch_s": round(median(times["hf"]), 3),
            "ours_useful_tok_s": round(tokens / median(times["ours"]), 1),
            "hf_useful_tok_s": round(tokens / median(times["hf"]), 1),
            "ratio": speed_ratio(times["ours"], times["hf"]), "first_batch_loss_gap": round(gap, 6)}


def bench_decode(shape, prompt_len, new_tokens, rounds, device, workdir):
    """Greedy decoding of one prompt: our KV cache (the Engine's token path) vs transformers' generate vs
    ours without a cache."""
    ours = our_model(shape, device, lively=True).eval()
    hf = hf_twin(ours, device, workdir / f"hf_{shape}").eval()
    cfg = ours.lm_cfg
    prompt = text_batch(cfg, 1, prompt_len, 0.0, device)[0]
    greedy = SamplingOptions(max_new_tokens=new_tokens)

    def ours_cached(compiled=False):   # no end token: like theirs, exactly new_tokens tokens
        return torch.stack(list(generate_tokens(ours, prompt, None, VisualInputs(), greedy, compiled=compiled)), dim=1)

    start = time.perf_counter()
    compiled_tokens = ours_cached(compiled=True)   # the first answer pays the compile
    compile_s = time.perf_counter() - start

    def theirs():
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              do_sample=False, num_beams=1, pad_token_id=0)
        return out[:, prompt_len:]

    @torch.no_grad()
    def ours_uncached():   # the whole sequence again for every new token
        seq = prompt
        with ours.lm.frozen_weights():
            for _ in range(new_tokens):
                token = ours.lm(ours.lm.embed_tokens(seq), last_only=True)[:, -1].argmax(-1)
                seq = torch.cat([seq, token[:, None]], dim=1)
        return seq[:, prompt_len:]

    tokens = ours_cached()
    same_hf, same_uncached = torch.equal(tokens, theirs()), torch.equal(tokens, ours_uncached())
    same_compiled = torch.equal(tokens, compiled_tokens)
    def three_times(generate):   # one answer is short: a round times three, for steadier ratios
        return lambda: [generate() for _ in range(3)]

    cpu_times = {}
    times = alternate({"ours": three_times(ours_cached), "hf": three_times(theirs),
                       "nocache": three_times(ours_uncached),
                       "compiled": three_times(lambda: ours_cached(compiled=True))}, rounds, cpu_times=cpu_times)
    per_s = {name: round(3 * new_tokens / median(t), 1) for name, t in times.items()}
    return {"shape": shape, "prompt_len": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
            "ours_tok_s": per_s["ours"], "hf_tok_s": per_s["hf"], "nocache_tok_s": per_s["nocache"],
            "compiled_tok_s": per_s["compiled"], "compile_s": round(compile_s, 1),
            "ratio_vs_hf": speed_ratio(times["ours"], times["hf"]),
            "compiled_ratio_vs_hf": speed_ratio(times["compiled"], times["hf"]),
            "compiled_ratio_vs_eager": speed_ratio(times["compiled"], times["ours"]),
            "same_tokens_compiled": same_compiled,
            "cpu_time_ratio_vs_hf": speed_ratio(cpu_times["ours"], cpu_times["hf"]),
            "ratio_vs_nocache": speed_ratio(times["ours"], times["nocache"]),
            "same_tokens_as_hf": same_hf, "same_tokens_as_nocache": same_uncached,
            "distinct_tokens": len(set(tokens[0].tolist()))}


# ---------------------------------------------------------------- frames

def write_test_video(path: Path, seconds: int, keyint: int, fps: int = 30, width: int = 1280, height: int = 720):
    """A 720p H.264 clip: a textured scene panned across (real decoding work on every frame) with a
    moving disc; a keyframe every `keyint` frames."""
    import av
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (height // 16 + 1, 2 * width // 16 + 1, 3), dtype=np.uint8)
    scene = np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))[:height, :2 * width] // 2
    scene += rng.integers(0, 40, scene.shape, dtype=np.uint8)
    ys, xs = np.mgrid[:height, :width]
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23",
                          "x264-params": f"keyint={keyint}:min-keyint={min(keyint, 25)}:scenecut=0"}
        for i in range(seconds * fps):
            x0 = (i * 4) % width
            frame = scene[:, x0:x0 + width].copy()
            cx, cy = (i * 7) % width, height // 2 + int(200 * math.sin(i / 30))
            frame[(xs - cx) ** 2 + (ys - cy) ** 2 < 80 ** 2] = (220, 40, 40)
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts, picture.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(picture))
        container.mux(stream.encode(None))
    tmp.rename(path)


def test_video(seconds: int, keyint: int) -> Path:
    path = BENCH / f"video_720p_{seconds}s_keyint{keyint}.mp4"
    if not path.exists():
        BENCH.mkdir(parents=True, exist_ok=True)
        log(f"writing {path} (1280x720, {seconds} s at 30 fps, keyframe every {keyint} frames) ...")
        write_test_video(path, seconds, keyint)
    return path


def decode_every_frame(path, num_frames: int, threads: int = 1) -> np.ndarray:
    """The baseline: decode the whole clip in order, every frame converted to RGB (what a
    cv2.VideoCapture read loop hands over), keeping the uniformly sampled ones."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads != 1:
            stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        wanted = uniform_indices(stream.frames, num_frames).tolist()
        kept = {}
        for i, frame in enumerate(container.decode(stream)):
            rgb = frame.to_ndarray(format="rgb24")
            if i in wanted:
                kept[i] = rgb
    return np.stack([kept[i] for i in wanted])


def bench_frames(seconds, keyint, rounds, num_frames=8):
    path = test_video(seconds, keyint)
    same = np.array_equal(read_video(path, num_frames), decode_every_frame(path, num_frames))
    cpu_times = {}
    times = alternate({"ours": lambda: read_video(path, num_frames),
                       "decode_all": lambda: decode_every_frame(path, num_frames)}, rounds, warmup=0, cpu_times=cpu_times)
    threaded = min(alternate({"t": lambda: decode_every_frame(path, num_frames, threads=0)}, 1, warmup=0)["t"])
    return {"video": str(path.relative_to(ROOT)), "seconds": seconds, "keyint": keyint, "frames": num_frames,
            "rounds": rounds, "ours_s": round(median(times["ours"]), 3),
            "decode_all_s": round(median(times["decode_all"]), 3), "ratio": speed_ratio(times["ours"], times["decode_all"]),
            "cpu_time_ratio": speed_ratio(cpu_times["ours"], cpu_times["decode_all"]),
            "decode_all_auto_threads_s": round(threaded, 3), "same_frames": bool(same)}


DEMO_TOWER = "ViT-Demo-16"   # scripts/demo.sh's CLIP_MODEL (model/vision_model/ViT-Demo-16.json)


def vision_weights(image_size: int = 128, tower: str = DEMO_TOWER) -> Path:
    """A seeded random tower (default: the demo's) at image_size px (128: the demo's), written once if absent."""
    from model.vision import VISION_DIR, save_random_tower
    path = VISION_DIR / f"{tower}-{image_size}-random-seed0.safetensors"
    if not path.exists():
        path = BENCH / path.name
        if not path.exists():
            BENCH.mkdir(parents=True, exist_ok=True)
            save_random_tower(tower, image_size, 0, str(path))
    return path


def bench_preprocess(seconds, keyint, rounds, num_frames=8):
    """Sampled frames per second through our whole path: read → CLIP transform (→ CLIP features)."""
    from model.vision import FrameEncoder
    path = test_video(seconds, keyint)
    encoder = FrameEncoder(VisionConfig(clip_model=DEMO_TOWER, clip_image_size=128,
                                        clip_pretrained=str(vision_weights())))
    with torch.no_grad():
        times = alternate({"pixels": lambda: encoder.clip_inputs(read_video(path, num_frames)),
                           "features": lambda: encoder.encode(read_video(path, num_frames))}, rounds)
    return {"video": str(path.relative_to(ROOT)), "encoder": f"{DEMO_TOWER} @128 px (the demo's)",
            "preprocess_frames_s": round(num_frames / median(times["pixels"]), 2),
            "features_frames_s": round(num_frames / median(times["features"]), 2)}


# ---------------------------------------------------------------- feature cache

def run(cmd, what):
    result = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"{what} failed: {tail}")
    return result


def demo_data(n_videos: int = 64) -> tuple:
    """(a small synthetic dataset's folder, a tokenizer trained on it), written once under out/bench/."""
    from dataset.synthetic import generate
    from model.tokenizer import train_tokenizer
    data = BENCH / "data"
    if not (data / "sft_video.jsonl").exists():
        log(f"writing a small synthetic dataset to {data} ...")
        generate(data, n_videos=n_videos, seed=0, n_images=0, n_test=1)
    tokenizer = BENCH / "tokenizer"
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer([data / "sft_video.jsonl"], tokenizer, 1024)
    return data, tokenizer


def bench_cache(rounds, steps, image_size=128, n_videos=64, batch=32, tower=DEMO_TOWER):
    """A video-SFT training step (train_sft.py, the demo's shapes) with cached CLIP features vs
    features computed online (frames decoded in DataLoader workers, CLIP in the step)."""
    data, tokenizer = demo_data(n_videos)
    weights = vision_weights(image_size, tower)
    vision = ["--clip_model", tower, "--clip_image_size", str(image_size), "--clip_pretrained", weights]
    run(["scripts/extract_features.py", "--data", data / "sft_video.jsonl", *vision, "--num_frames", "8"],
        "extract_features.py")
    folders = [p for p in (data / "features").iterdir()
               if p.is_dir() and p.name.startswith(f"{tower}-{image_size}-") and p.name.endswith("-f8")]
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    cache_bytes = sum(f.stat().st_size for f in folders[0].iterdir())
    arch = ["--hidden_size", "128", "--num_layers", "2", "--num_heads", "4", "--num_kv_heads", "2",
            "--vocab_size", "1024", "--num_frames", "8", "--num_visual_tokens", "8", "--summary_dim", "128"]

    def train(feature_dir):
        out = BENCH / "runs" / f"{tower}-{image_size}px-{'online' if feature_dir == 'none' else 'cached'}"
        cmd = ["train_sft.py", "--stage", "video", "--data_path", data / "sft_video.jsonl", "--out_dir", out,
               "--tokenizer", tokenizer, *arch, *vision, "--batch_size", batch, "--max_steps", steps,
               "--val_every", "0", "--val_samples", "4", "--no_progress", "--seed", "0"]
        run(cmd + (["--feature_dir", "none"] if feature_dir == "none" else []), f"train_sft.py ({out.name})")
        rows = [json.loads(line) for line in (out / "logs" / "sft_video_128.jsonl").read_text().splitlines()]
        return [r["step_s"] for r in rows[1:]]   # the first step also warms the loader up

    step_s = {"cached": [], "online": []}
    for _ in range(rounds):
        for kind in step_s:
            step_s[kind].append(median(train("none" if kind == "online" else None)))
    return {"batch": batch, "frames": 8, "encoder": f"{tower} @{image_size} px", "steps_per_run": steps, "rounds": rounds,
            "cached_step_s": round(median(step_s["cached"]), 4), "online_step_s": round(median(step_s["online"]), 4),
            "ratio": speed_ratio(step_s["cached"], step_s["online"]),
            "cache_bytes_per_video": round(cache_bytes / len(manifest)), "cached_videos": len(manifest)}


# ---------------------------------------------------------------- serving

SERVE_CLIENTS, SERVE_LOAD, SERVE_TOKENS = 8, 200, 64
SERVE_QUESTIONS = ("Describe the video.", "What happens in the video?", "Which shape moves first?",
                   "How many shapes are in the video?")


def serve_checkpoint(image_size: int = 128) -> Path:
    """A checkpoint of the demo's shapes (LM 128×2, vocab 1024; ViT-Demo-16 at 128 px, 8 frames, 8 visual
    tokens) with lively random LM weights, written once: greedy answers run to max_tokens in varied
    tokens, so every request decodes alike and both servers' answers can be compared token for token."""
    from model.checkpoint import save_checkpoint
    from model.chat import ChatEncoder, load_tokenizer
    from model.vision import FrameEncoder
    _, tokenizer = demo_data()
    path = BENCH / "serve" / "serve_random_128.safetensors"
    if path.exists():
        return path
    vision = VisionConfig(clip_model=DEMO_TOWER, clip_image_size=image_size, clip_pretrained=str(vision_weights(image_size)),
                          num_frames=8, num_visual_tokens=8, summary_dim=128,
                          vision_token_id=ChatEncoder(load_tokenizer(tokenizer), 8).vision_pad)
    vision.clip_dim = FrameEncoder(vision).dim
    torch.manual_seed(0)
    model = VideoLLM(LMConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                              intermediate_size=384), vision)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[1] ** -0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path, stage="video", step=0, tokenizer=str(tokenizer))
    return path


def bench_eval(max_new_tokens: int = 16, batch: int = 32) -> dict:
    """eval.py's batch mode (Engine.answer_dataset) on the small dataset's video-SFT file with the serve
    checkpoint: every answer runs to max_new_tokens (its lively random weights never say <|im_end|>)."""
    from model.engine import Engine
    data, _ = demo_data()
    engine = Engine.load(weight=str(serve_checkpoint()), device="cpu")
    start = time.perf_counter()
    answers = sum(len(b.predictions) for b in engine.answer_dataset(
        data / "sft_video.jsonl", SamplingOptions(max_new_tokens=max_new_tokens), batch_size=batch))
    seconds = time.perf_counter() - start
    return {"answers": answers, "seconds": round(seconds, 2), "answers_s": round(answers / seconds, 2),
            "max_new_tokens": max_new_tokens, "batch": batch,
            "features": "online (frames decoded, CLIP run) unless the cache section left a cache"}


class ServerProcess:
    """scripts/serve_openai_api.py on a free loopback port, in its own process (so its memory is its own)."""

    def __init__(self, weight: Path, max_batch: int, max_queue: int, threads: int):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {})}
        self.process = subprocess.Popen(
            [sys.executable, "scripts/serve_openai_api.py", "--weight", str(weight), "--port", str(self.port),
             "--max_batch", str(max_batch), "--max_queue", str(max_queue), "--device", "cpu", "--log_level", "warning"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_until_up()

    def _wait_until_up(self, timeout_s: float = 120):
        import httpx
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"the server exited: {(self.process.stderr.read().strip().splitlines() or ['?'])[-1]}")
            try:
                httpx.get(self.url + "/v1/models", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.2)
        raise BenchError("the server did not start in time")

    def memory(self, field: str = "VmRSS") -> int:
        """Bytes of /proc/<pid>/status's field: VmRSS now, VmHWM the peak."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"no {field} in /proc/{self.process.pid}/status")

    def reset_peak(self) -> bool:
        """Start VmHWM afresh at the current RSS (Linux: clear_refs 5); False where that is not allowed."""
        try:
            Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def close(self):
        self.process.terminate()
        self.process.wait(30)


def serve_requests(count: int, with_video: bool) -> list:
    """Greedy chat requests of SERVE_TOKENS new tokens at most: questions about the bench's synthetic videos
    (sent as data: URLs), or the questions alone (numbered, so prompts differ in length too)."""
    data, _ = demo_data()
    videos = sorted((data / "videos").glob("v*.mp4"))
    bodies = []
    for i in range(count):
        question = SERVE_QUESTIONS[i % len(SERVE_QUESTIONS)]
        if with_video:
            url = "data:video/mp4;base64," + base64.b64encode(videos[i % len(videos)].read_bytes()).decode()
            content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]
        else:
            content = f"Question {i + 1} of {count}. {question}"
        bodies.append({"model": "serve_random_128", "messages": [{"role": "user", "content": content}],
                       "temperature": 0, "max_tokens": SERVE_TOKENS})
    return bodies


def fire(url: str, bodies: list) -> dict:
    """Send every request at once → wall seconds (from the first send to the last answer; the client is
    made before), per-request latencies, completion tokens, answers and statuses."""
    import asyncio
    import httpx

    async def one(client, body):
        start = time.perf_counter()
        response = await client.post(url + "/v1/chat/completions", json=body)
        reply = response.json() if response.status_code == 200 else None
        return time.perf_counter() - start, response.status_code, reply

    async def every():
        limits = httpx.Limits(max_connections=len(bodies) + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits, verify=False) as client:   # loopback http: no TLS
            start = time.perf_counter()
            done = await asyncio.gather(*(one(client, b) for b in bodies))
            return time.perf_counter() - start, done

    wall, done = asyncio.run(every())
    replies = [reply for _, _, reply in done]
    return {"wall_s": wall, "latencies": [t for t, _, _ in done], "statuses": [s for _, s, _ in done],
            "tokens": sum(r["usage"]["completion_tokens"] for r in replies if r),
            "answers": [r["choices"][0]["message"]["content"] if r else None for r in replies]}


def quantile(values: list, q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 4)


def memory_under_load(server: ServerProcess) -> dict:
    """The server's peak RSS while SERVE_LOAD requests arrive at once, against its RSS at rest before."""
    bodies = serve_requests(SERVE_LOAD, with_video=True)
    idle = server.memory("VmRSS")
    exact = server.reset_peak()   # else the peak of start-up (loading) would count
    samples, stop = [idle], threading.Event()

    def sample():   # a fallback where the peak cannot be reset, and a check where it can
        while not stop.wait(0.01):
            samples.append(server.memory())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = fire(server.url, bodies)
    finally:
        stop.set()
        sampler.join()
    peak = max(server.memory("VmHWM") if exact else 0, max(samples))
    if any(status != 200 for status in load["statuses"]):
        raise BenchError(f"serve: {sum(s != 200 for s in load['statuses'])} of {SERVE_LOAD} requests under load failed")
    return {"requests": SERVE_LOAD, "idle_rss_mb": round(idle / 2 ** 20, 1), "peak_rss_mb": round(peak / 2 ** 20, 1),
            "rss_ratio": round(peak / idle, 3), "peak_from": "VmHWM after clear_refs" if exact else "10 ms samples",
            "wall_s": round(load["wall_s"], 2), "tok_s": round(load["tokens"] / load["wall_s"], 1),
            "p50_s": quantile(load["latencies"], 0.5), "p95_s": quantile(load["latencies"], 0.95)}


def compare_servers(servers: dict, bodies: list, rounds: int) -> dict:
    """The same requests, all at once, to each server in alternating rounds: tokens/s, their ratio, latencies."""
    runs = {name: [] for name in servers}

    def round_on(name):
        return lambda: runs[name].append(fire(servers[name].url, bodies))
    alternate({name: round_on(name) for name in servers}, rounds)   # the order; fire() times its own requests
    runs = {name: r[1:] for name, r in runs.items()}   # the first of each is the warm-up round
    times = {name: [r["wall_s"] for r in runs[name]] for name in runs}
    every = [r for name in runs for r in runs[name]]
    if any(status != 200 for r in every for status in r["statuses"]):
        raise BenchError("serve: a request of the concurrent clients failed")
    tokens = every[0]["tokens"]
    latencies = {name: [t for r in runs[name] for t in r["latencies"]] for name in runs}
    return {"tokens_per_round": tokens, "batched_tok_s": round(tokens / median(times["batched"]), 1),
            "sequential_tok_s": round(tokens / median(times["sequential"]), 1),
            "ratio": speed_ratio(times["batched"], times["sequential"]),
            "same_answers": all(r["answers"] == every[0]["answers"] for r in every),
            "p50_s": quantile(latencies["batched"], 0.5), "p95_s": quantile(latencies["batched"], 0.95),
            "sequential_p50_s": quantile(latencies["sequential"], 0.5),
            "sequential_p95_s": quantile(latencies["sequential"], 0.95)}


def bench_serve(rounds: int, threads: int) -> dict:
    """SERVE_CLIENTS concurrent clients (one request each) on the server batching them vs the same server
    code with --max_batch 1, with and without a video per request; then memory under SERVE_LOAD requests."""
    weight = serve_checkpoint()
    servers = {"batched": ServerProcess(weight, SERVE_CLIENTS, SERVE_LOAD, threads),
               "sequential": ServerProcess(weight, 1, SERVE_LOAD, threads)}
    try:
        video = compare_servers(servers, serve_requests(SERVE_CLIENTS, with_video=True), rounds)
        text = compare_servers(servers, serve_requests(SERVE_CLIENTS, with_video=False), rounds)
        load = memory_under_load(servers["batched"])
    finally:
        for server in servers.values():
            server.close()
    return {"clients": SERVE_CLIENTS, "max_tokens": SERVE_TOKENS, "rounds": rounds,
            "model": "demo shapes, random weights (LM 128x2, ViT-Demo-16 @128 px, 8 frames), greedy",
            "video": video, "text": text, "load": load}


# ---------------------------------------------------------------- demo and GPU

def demo_times(run_demo: bool) -> dict:
    path = ROOT / "out" / "demo_times.json"
    if run_demo:
        log("running scripts/demo.sh (about 8 minutes) ...")
        if subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT).returncode:
            raise BenchError("scripts/demo.sh failed")
    if not path.exists():
        return {"source": "out/demo_times.json not found: run bash scripts/demo.sh (or pass --run_demo)"}
    times = json.loads(path.read_text())
    written = datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    return {"source": f"out/demo_times.json written {written}" + (" by this run" if run_demo else ""),
            "demo_wall_s": times.get("total"), "demo_peak_rss_gb": times.get("peak_rss_gb")}


def gpu_peak(device) -> tuple:
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAKS.items():
        if all(word in name for word in key.split()):
            return peak, f"{key} data sheet (dense bf16)"
    return matmul_peak(device, torch.bfloat16, n=8192), "measured 8192² bf16 matmul"


def bench_gpu(rounds, workdir):
    device = torch.device("cuda")
    peak, peak_source = gpu_peak(device)
    result = {"device": torch.cuda.get_device_name(device), "peak_flops": peak, "peak_source": peak_source,
              "measured_matmul_flops": matmul_peak(device, torch.bfloat16, n=8192)}
    for shape, batch, seq_len in (("26M", 32, 512), ("104M", 16, 1024)):
        runs = {}
        for mode in ("eager", "compiled"):
            run_ = bench_train(shape, batch, seq_len, 1.0, rounds, device, workdir, autocast_dtype=torch.bfloat16,
                               compile_ours=mode == "compiled")
            run_["mfu"] = round(run_["ours_tok_s"] * run_["flops_per_token"] / peak, 4)
            runs[mode] = run_
        best = max(runs, key=lambda mode: runs[mode]["mfu"])
        result[shape] = {**runs, "best": best}
    return result


# ---------------------------------------------------------------- report

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def goal_table(values: dict) -> dict:
    met = {}
    for key, op, target in GOALS:
        value = values.get(key)
        if isinstance(value, (int, float)):
            met[key] = bool(value >= target if op == ">=" else value <= target)
    return met


def print_table(values: dict, met: dict):
    goals = {key: f"{op} {target:g}" for key, op, target in GOALS}
    print(f"{'metric':<32}{'value':>14}  {'goal':<9}met")
    for key, value in values.items():
        if isinstance(value, (dict, list)) or key in ("details", "goals", "met"):
            continue
        shown = "—" if value is None else (f"{value:,.3f}" if isinstance(value, float) else str(value))
        mark = {True: "yes", False: "NO"}.get(met.get(key), "")
        print(f"{key:<32}{shown:>14}  {goals.get(key, ''):<9}{mark}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    p.add_argument("--out", default="out/bench.json")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds for the LM and decoding sections")
    p.add_argument("--sft_samples", type=int, default=512, help="samples of the real-length mix in the sft section's epoch")
    p.add_argument("--sft_rounds", type=int, default=3, help="alternating epoch pairs in the sft section")
    p.add_argument("--frame_rounds", type=int, default=3)
    p.add_argument("--cache_rounds", type=int, default=2, help="training-run pairs (cached, online)")
    p.add_argument("--cache_steps", type=int, default=6, help="optimizer steps per training run")
    p.add_argument("--serve_rounds", type=int, default=5, help="alternating rounds of 8 clients (batched, one at a time)")
    p.add_argument("--data_rows", type=int, default=1_000_000, help="rows of the data section's annotation file")
    p.add_argument("--video_seconds", type=int, default=60)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for both sides (0: torch's default); training runs get OMP_NUM_THREADS")
    p.add_argument("--run_demo", action="store_true", help="run scripts/demo.sh first (else read out/demo_times.json)")
    return p.parse_args(argv)


def lm_section(args, device, workdir):
    log("lm: training steps, ours vs transformers LlamaForCausalLM ...")
    peak_before = matmul_peak(device, torch.float32)
    lm = bench_train("small", 32, 128, 1.0, args.rounds, device, workdir)
    sft = bench_train("small", 32, 128, SFT_LABELLED, args.rounds, device, workdir)
    compiled = bench_train("small", 32, 128, 1.0, args.rounds, device, workdir, compile_ours=True)
    big = bench_train("26M", 8, 256, 1.0, max(3, args.rounds // 2), device, workdir)
    peak = max(peak_before, matmul_peak(device, torch.float32))
    for run_ in (lm, big):
        run_["cpu_mfu"] = round(run_["ours_tok_s"] * run_["flops_per_token"] / peak, 4)
    detail = {"small_lm": lm, "small_sft": sft, "small_lm_compiled": compiled, "26M_lm": big,
              "cpu_matmul_flops": round(peak)}
    return detail, dict(train_vs_hf=lm["ratio"], train_vs_hf_sft=sft["ratio"], train_vs_hf_compiled=compiled["ratio"],
                        train_vs_hf_26M=big["ratio"], train_tok_s=lm["ours_tok_s"], cpu_mfu=lm["cpu_mfu"],
                        cpu_mfu_26M=big["cpu_mfu"])


def sft_section(args, device, workdir):
    from bench_sft import demo_samples, real_mix_lengths, samples_of_lengths
    log("sft: one SFT epoch, ours packed vs LlamaForCausalLM with transformers' padding collator ...")
    vocab = SHAPES["small"]["vocab_size"]
    real = bench_sft_epoch(samples_of_lengths(real_mix_lengths(args.sft_samples), vocab), "small", 16,
                           args.sft_rounds, device, workdir)
    data, tokenizer = demo_data()
    demo = bench_sft_epoch(demo_samples(data, tokenizer, visual_slot_id=4), "small", 16, args.sft_rounds,
                           device, workdir)
    return {"real_length_mix": real, "demo_video_sft": demo}, dict(
        sft_epoch_vs_hf_padded=real["ratio"], sft_epoch_vs_hf_padded_demo=demo["ratio"],
        sft_padding_share_hf=real["padding_share_hf"], sft_padding_share_ours=real["padding_share_ours"],
        sft_padding_share_hf_demo=demo["padding_share_hf"], sft_padding_share_ours_demo=demo["padding_share_ours"])


def decode_section(args, device, workdir):
    log("decode: greedy generation, ours vs transformers generate vs no cache ...")
    small = bench_decode("small", 64, 64, args.rounds, device, workdir)
    big = bench_decode("26M", 64, 64, max(3, args.rounds // 2), device, workdir)
    # decode_vs_hf: the compiled static-shape steps (eval.py --compile); decode_eager_vs_hf: the default path.
    return {"small": small, "26M": big}, dict(
        decode_vs_hf=small["compiled_ratio_vs_hf"], decode_eager_vs_hf=small["ratio_vs_hf"],
        decode_cache_vs_nocache=small["ratio_vs_nocache"], decode_tok_s=small["compiled_tok_s"],
        decode_eager_tok_s=small["ours_tok_s"], decode_vs_hf_26M=big["compiled_ratio_vs_hf"],
        decode_eager_vs_hf_26M=big["ratio_vs_hf"], decode_cache_vs_nocache_26M=big["ratio_vs_nocache"],
        decode_compile_s=small["compile_s"])


def frames_section(args, device, workdir):
    log("frames: sampling 8 frames of a 720p clip, ours vs decoding every frame ...")
    short = bench_frames(args.video_seconds, 30, args.frame_rounds)
    long = bench_frames(args.video_seconds, 250, args.frame_rounds)
    pre = bench_preprocess(args.video_seconds, 30, args.frame_rounds)
    return {"keyframe_every_1s": short, "keyframe_every_250": long, "preprocess": pre}, dict(
        frames_vs_decode_all=short["ratio"], frames_vs_decode_all_keyint250=long["ratio"],
        preprocess_frames_s=pre["preprocess_frames_s"], features_frames_s=pre["features_frames_s"])


def cache_section(args, device, workdir):
    log("cache: video-SFT steps with cached vs online CLIP features (train_sft.py runs) ...")
    demo_size = bench_cache(args.cache_rounds, args.cache_steps, image_size=128)
    own_size = bench_cache(args.cache_rounds, args.cache_steps, image_size=224)
    # A real encoder's shape (ViT-B-16 at 224 px, random weights): ~50× the stand-in's compute a frame,
    # so a smaller batch and fewer steps keep the online runs to minutes.
    vitb16 = bench_cache(args.cache_rounds, max(2, args.cache_steps // 2), image_size=224, batch=8, tower="ViT-B-16")
    return {"demo_128px": demo_size, "own_224px": own_size, "vitb16_224px": vitb16}, dict(
        cached_vs_online=demo_size["ratio"], cached_vs_online_224px=own_size["ratio"],
        cached_vs_online_vitb16=vitb16["ratio"],
        cache_bytes_per_video=demo_size["cache_bytes_per_video"])


def eval_section(args, device, workdir):
    log("eval: batch scoring, answers per second ...")
    scoring = bench_eval()
    return scoring, dict(eval_answers_s=scoring["answers_s"])


def data_section(args, device, workdir):
    from bench_data import bench_data
    log(f"data: a {args.data_rows:,}-row annotation file, the annotation store vs the whole-file jsonl parse ...")
    data = bench_data(args.data_rows, workdir)
    store, jsonl, per_1m = data["store"], data["jsonl"], 1e6 / args.data_rows
    return data, dict(
        data_rss_mb_per_1m_rows=round(store["rss_added_mb"] * per_1m, 1),
        data_open_s_per_1m_rows=round(store["open_s"] * per_1m, 3),
        data_worker_growth_mb=max(store["worker_growth_mb"]),
        data_worker_private_growth_mb=max(store["worker_private_growth_mb"]),
        data_samples_s=store["samples_s"], data_build_s_per_1m_rows=round(data["store_build_s"] * per_1m, 1),
        data_rss_mb_per_1m_rows_jsonl=round(jsonl["rss_added_mb"] * per_1m, 1),
        data_open_s_per_1m_rows_jsonl=round(jsonl["open_s"] * per_1m, 3),
        data_worker_growth_mb_jsonl=max(jsonl["worker_growth_mb"]),
        data_worker_private_growth_mb_jsonl=max(jsonl["worker_private_growth_mb"]),
        data_samples_s_jsonl=jsonl["samples_s"])


def serve_section(args, device, workdir):
    log(f"serve: {SERVE_CLIENTS} concurrent clients, batched vs one at a time; memory under {SERVE_LOAD} requests ...")
    serve = bench_serve(args.serve_rounds, args.threads)
    video, text = serve["video"], serve["text"]
    return serve, dict(serve_batched_vs_sequential=video["ratio"], serve_batched_vs_sequential_text=text["ratio"],
                       serve_tok_s=video["batched_tok_s"], serve_tok_s_text=text["batched_tok_s"],
                       serve_p50_s=video["p50_s"], serve_p95_s=video["p95_s"], serve_rss_ratio=serve["load"]["rss_ratio"])


def demo_section(args, device, workdir):
    """The demo's times as read (or measured): the one section whose detail carries no measured_at."""
    demo = demo_times(args.run_demo)
    log(f"demo: {demo['source']}")
    return demo, dict(demo_wall_s=demo.get("demo_wall_s"), demo_peak_rss_gb=demo.get("demo_peak_rss_gb"))


def gpu_section(args, device, workdir):
    if not torch.cuda.is_available():
        log("gpu: skipped (no CUDA device on this machine)")
        return {"skipped": "no CUDA device on this machine"}, {}
    log("gpu: bf16 training steps of the 26M and 104M shapes ...")
    gpu = bench_gpu(max(5, args.rounds), workdir)
    values = {}
    for shape in ("26M", "104M"):
        best = gpu[shape][gpu[shape]["best"]]   # eager or --compile, whichever is faster
        values.update({f"gpu_tok_s_{shape}": best["ours_tok_s"], f"gpu_mfu_{shape}": best["mfu"],
                       f"gpu_train_vs_hf_{shape}": best["ratio"]})
    return gpu, values


# Each section: (args, CPU device, scratch folder) → (its details, the values it adds to the table).
SECTION_RUNS = {"lm": lm_section, "sft": sft_section, "decode": decode_section, "eval": eval_section, "frames": frames_section, "cache": cache_section,
                "data": data_section, "serve": serve_section, "demo": demo_section, "gpu": gpu_section}


def chosen_sections(only: str) -> list:
    sections = [s.strip() for s in only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        sys.exit(f"error: --only: unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    return sections


def machine(stamp: str) -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "measured_at": stamp}


def write_report(values, details, out_path, argv):
    met = goal_table(values)
    report = {"values": values, "goals": {k: f"{op} {t:g}" for k, op, t in GOALS}, "met": met, "details": details,
              "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    # The keys at the top level, next to the structured report.
    report.update(values)
    if "gpu_tok_s_104M" in values:
        report["gpu_tok_s"] = {s_: values[f"gpu_tok_s_{s_}"] for s_ in ("26M", "104M")}
        report["gpu_mfu"] = {s_: values[f"gpu_mfu_{s_}"] for s_ in ("26M", "104M")}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1) + "\n")
    print_table(values, met)
    print(f"→ {out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path}")


def main(argv=None):
    args = parse_args(argv)
    sections = chosen_sections(args.only)
    out_path = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() and len(sections) < len(SECTIONS) else {}
    values, details = report.get("values", {}), report.get("details", {})
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)   # for the train_sft.py runs
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    details["machine"] = machine(stamp)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in (s for s in SECTIONS if s in sections):
                detail, added = SECTION_RUNS[name](args, torch.device("cpu"), Path(tmp))
                details[name] = detail if name == "demo" else {**detail, "measured_at": stamp}
                values.update(added)
    except BenchError as e:
        sys.exit(f"error: {e}")
    write_report(values, details, out_path, argv)


if __name__ == "__main__":
    main()
