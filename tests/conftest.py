"""Session fixtures: a tiny synthetic dataset, tokenizer, random vision tower, and helpers to
build tiny models in-process or run the train/eval scripts as subprocesses."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import LMConfig, VisionConfig
from model.vlm import VideoLLM

ROOT = Path(__file__).resolve().parents[1]

# Tiny tensors run fastest on one thread, and a second thread can stall on a busy 2-core box.
torch.set_num_threads(1)

CLIP_MODEL, CLIP_SIZE = "ViT-Tiny-16", 32
TINY_ARCH = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, num_frames=4,
                 num_visual_tokens=2, summary_dim=32, summary_layers=1)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vlm")


@pytest.fixture(scope="session")
def synthetic(workdir) -> Path:
    """12 train videos, 12 images, 6 test videos at 64 px (treat as read-only)."""
    from dataset.synthetic import generate
    out = workdir / "synthetic"
    generate(out, n_videos=12, seed=0, n_test=6, size=64, workers=2)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(synthetic, workdir) -> Path:
    from model.tokenizer import train_tokenizer as train
    out = workdir / "tokenizer"
    train([synthetic / f"{s}.jsonl" for s in ("pretrain", "sft_image", "sft_video", "test")], out, 512)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.chat import load_tokenizer
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def vocab_size(tokenizer) -> int:
    return 64 * math.ceil(len(tokenizer) / 64)


@pytest.fixture(scope="session")
def vision_file(workdir) -> Path:
    from model.vision import save_random_tower
    path = workdir / "vit_tiny_random.safetensors"
    save_random_tower(CLIP_MODEL, CLIP_SIZE, 0, str(path))
    return path


@pytest.fixture(scope="session")
def vision_cfg(vision_file) -> VisionConfig:
    return VisionConfig(clip_model=CLIP_MODEL, clip_image_size=CLIP_SIZE, clip_pretrained=str(vision_file),
                        num_frames=TINY_ARCH["num_frames"])


@pytest.fixture(scope="session")
def frame_encoder(vision_cfg):
    from model.vision import FrameEncoder
    return FrameEncoder(vision_cfg)


def tiny_vlm(seed=0, vocab_size=64, clip_dim=16, summary="temporal", num_heads=2, num_kv_heads=1,
             num_frames=4, num_visual_tokens=2, vision_token_id=3, time_encoding="index",
             segment_seconds=0.0, qk_norm=False) -> VideoLLM:
    """A tiny VideoLLM fed with hand-made (N, T, clip_dim) features instead of CLIP."""
    torch.manual_seed(seed)
    lm = LMConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=num_heads,
                  num_kv_heads=num_kv_heads, intermediate_size=64, max_seq_len=128, qk_norm=qk_norm)
    vis = VisionConfig(clip_dim=clip_dim, num_frames=num_frames, summary=summary,
                       num_visual_tokens=num_visual_tokens, summary_dim=16, summary_layers=1,
                       summary_heads=2, vision_token_id=vision_token_id, time_encoding=time_encoding,
                       segment_seconds=segment_seconds)
    return VideoLLM(lm, vis).eval()


@pytest.fixture
def make_vlm():
    return tiny_vlm


# ---------------------------------------------------------------- subprocess runs

def run_python(*args, timeout=240) -> subprocess.CompletedProcess:
    """`python *args` from the repo root; stdout/stderr captured as text."""
    # Spinning OpenMP threads stall for a whole time slice per op when another process holds a
    # core (a shared 2-core box: ~1.5 s instead of ~10 ms per tiny step); sleeping ones do not.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def read_log(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="session")
def fresh_flags(tokenizer_dir, vision_file, vocab_size) -> list:
    """Architecture + runtime flags for a tiny run that starts from scratch."""
    arch = [f"--{k}={v}" for k, v in TINY_ARCH.items()]
    return [*arch, f"--vocab_size={vocab_size}", f"--clip_model={CLIP_MODEL}",
            f"--clip_image_size={CLIP_SIZE}", f"--clip_pretrained={vision_file}",
            f"--tokenizer={tokenizer_dir}", "--batch_size=4", "--max_steps=3", "--no_progress",
            "--val_every=0", "--num_workers=0", "--seed=0"]


@pytest.fixture(scope="session")
def weight_flags(tokenizer_dir) -> list:
    """Runtime flags only, for runs whose architecture comes from --from_weight."""
    return [f"--tokenizer={tokenizer_dir}", "--batch_size=4", "--max_steps=3", "--no_progress",
            "--val_every=0", "--num_workers=0", "--seed=0"]


@pytest.fixture(scope="session")
def train():
    """train(script, flags...) → CompletedProcess; later flags override earlier ones (argparse)."""
    def run(script, *flags, timeout=240):
        return run_python(script, *flags, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def video_checkpoint(workdir, synthetic, fresh_flags, train) -> Path:
    """A tiny video model trained from scratch just long enough to answer with words, not only <|im_end|>."""
    out = workdir / "eval_out"
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                   f"--out_dir={out}", *fresh_flags, "--max_steps=250", "--learning_rate=5e-3",
                   "--warmup_steps=2")
    assert result.returncode == 0, result.stderr
    return out / "sft_video_32.safetensors"


@pytest.fixture(scope="session")
def caption_checkpoint(workdir, synthetic, fresh_flags, train) -> Path:
    """A tiny video model trained only on the caption turns of sft_video.jsonl, so that it answers every
    question with a sentence of many tokens: what streaming tests need to see partial answers. (The
    general checkpoint above answers most caption prompts in one word, and which ones changes with the
    run's tokenizer and numerics.)"""
    from dataset.synthetic import PHRASINGS
    prompts = set(PHRASINGS["video_caption"]["seen"])
    records = []
    for line in (synthetic / "sft_video.jsonl").read_text().splitlines():
        record = json.loads(line)
        turns = record["conversations"]
        for ask, answer in zip(turns[::2], turns[1::2]):
            if ask["content"].replace("<video>", "").strip() in prompts:
                records.append({"id": f"{record['id']}-{len(records)}", "video": record["video"],
                                "conversations": [{"role": "user", "content": "<video>\n" + ask["content"].replace("<video>", "").strip()},
                                                  {"role": "assistant", "content": answer["content"]}],
                                "category": "caption"})
    data = synthetic.parent / "captions_only.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = workdir / "caption_out"
    result = train("train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}",
                   f"--out_dir={out}", *fresh_flags, "--max_steps=250", "--learning_rate=5e-3", "--warmup_steps=2")
    assert result.returncode == 0, result.stderr
    return out / "sft_video_32.safetensors"


@pytest.fixture(scope="session")
def mixed_lengths(synthetic, workdir) -> Path:
    """sft_video.jsonl's multi-turn conversations followed by pretrain.jsonl's one-line video captions (media
    relative to `synthetic`): long and short samples mixed, as in real SFT data, so packing has room."""
    captions = [line for line in (synthetic / "pretrain.jsonl").read_text().splitlines() if '"video"' in line]
    path = workdir / "mixed_lengths.jsonl"
    path.write_text((synthetic / "sft_video.jsonl").read_text() + "".join(line + "\n" for line in captions))
    return path


@pytest.fixture(scope="session")
def feature_cache(workdir, synthetic, frame_encoder) -> Path:
    """The feature cache of sft_video.jsonl's media for the tiny tower (runs that need no CLIP are faster)."""
    from dataset.features import FeatureWriter
    from extract_features import collect_media, extract
    folder = workdir / "features_sft_video"
    extract(collect_media([synthetic / "sft_video.jsonl"]), synthetic, frame_encoder, FeatureWriter(folder),
            fps=None, num_frames=TINY_ARCH["num_frames"], num_workers=0)
    return folder
