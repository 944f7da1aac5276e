"""bench.py's data section: the memory and time of opening a large annotation file and reading it through
DataLoader workers, the annotation store (dataset/annotations.py) against the whole-file jsonl parse it replaced.

The file: records shaped like LLaVA-Video-178K by bench_sft.REAL_MIX (detailed captions of a few hundred
words for some, short open-ended and multiple-choice QA for most), one video each. Each loader is measured
in a fresh process (`python scripts/bench_data.py measure ...`): resident memory added by opening (VmRSS
before and after, /proc/self/status), the time to open, then one shuffled pass with 2 DataLoader workers
whose items are the parsed records (no media decoding, no tokenizer): each worker's growth over the pass,
as VmRSS and as private memory (Private_Clean + Private_Dirty of /proc/<pid>/smaps_rollup, which shows
the pages copy-on-read duplicates, where VmRSS counts them from the fork on), and samples/s.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import _repo  # noqa: F401  (puts the repository root on sys.path)
from bench_sft import REAL_MIX, lognormal_lengths

MB = 2 ** 20
WORKERS, BATCH = 2, 512


def write_corpus(path: Path, rows: int, seed: int = 0):
    """`rows` records of the REAL_MIX lengths (words ≈ tokens), written in chunks of 10,000."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(4096)] + ["the", "a", "red", "circle", "moves", "left", "and", "then"])
    pool = " ".join(rng.choice(vocab, 2_000_000))   # texts are windows of one long random text
    splits = list(REAL_MIX)
    shares = np.array([REAL_MIX[s][0] for s in splits], float)
    with open(path, "w", encoding="utf-8") as f:
        for first in range(0, rows, 10_000):
            n = min(10_000, rows - first)
            split = rng.choice(len(splits), n, p=shares / shares.sum())
            chars = np.zeros((n, 2), int)   # question and answer lengths in characters (~6 a word)
            for k, name in enumerate(splits):
                chosen = split == k
                for side in (0, 1):
                    chars[chosen, side] = 6 * lognormal_lengths(rng, int(chosen.sum()), *REAL_MIX[name][1 + side])
            starts = rng.integers(0, len(pool) - chars.max() - 1, (n, 2))
            f.writelines(record(first + i, splits[split[i]], pool[starts[i, 0]:starts[i, 0] + chars[i, 0]],
                                pool[starts[i, 1]:starts[i, 1] + chars[i, 1]]) for i in range(n))


def record(index: int, split: str, question: str, answer: str) -> str:
    return json.dumps({"id": f"r{index}", "video": f"videos/{index % 178_000:06d}.mp4", "category": split,
                       "conversations": [{"role": "user", "content": "<video>\n" + question},
                                         {"role": "assistant", "content": answer}]}) + "\n"


def status_mb(pid="self", field="VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    raise KeyError(field)


def private_mb(pid) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return sum(int(fields[k].split()[0]) for k in ("Private_Clean", "Private_Dirty")) * 1024 / MB


class StoreRecords:
    """Items through the training dataset's own reading path: the annotation store."""

    def __init__(self, path):
        from dataset.vlm_dataset import ConversationDataset
        self.data = ConversationDataset(path, chat=None, num_frames=1, max_len=1)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data.store.record(self.data.rows[i])


class JsonlRecords:
    """The old loader, as it was: every line parsed into a list of (line number, dict) at start-up."""

    def __init__(self, path):
        self.rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    self.rows.append((n, json.loads(line)))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def characters(items) -> int:   # a batch's collate: small to send back, and it touches every record
    return sum(len(turn["content"]) for _, record in items for turn in record["conversations"])


def worker_memory(pids) -> list:
    return [(status_mb(pid), private_mb(pid)) for pid in pids]


def measure(loader: str, path: str) -> dict:
    """In this (fresh) process: open the annotations with `loader`, then one shuffled pass with 2 workers."""
    import torch
    from torch.utils.data import DataLoader
    import dataset.vlm_dataset  # noqa: F401  (imports before the first reading: they are no part of opening)
    before = status_mb()
    start = time.perf_counter()
    data = {"store": StoreRecords, "jsonl": JsonlRecords}[loader](path)
    open_s, opened = time.perf_counter() - start, status_mb()
    loader_ = DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=characters,
                         generator=torch.Generator().manual_seed(0))
    batches = iter(loader_)
    start, total = time.perf_counter(), next(batches)
    pids = [w.pid for w in batches._workers]
    first = worker_memory(pids)   # once the workers have started and read their first batches
    for k, chars in enumerate(batches, 2):
        total += chars
        if k == len(loader_):   # the last batch: the workers are still alive
            last = worker_memory(pids)
    pass_s = time.perf_counter() - start
    growth = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(first, last)]
    return {"rows": len(data), "rss_added_mb": round(opened - before, 1), "open_s": round(open_s, 3),
            "worker_rss_start_mb": [round(a[0], 1) for a in first],
            "worker_growth_mb": [round(g[0], 1) for g in growth],
            "worker_private_growth_mb": [round(g[1], 1) for g in growth],
            "samples_s": round(len(data) / pass_s), "pass_s": round(pass_s, 1), "characters": total}


def run_measure(loader: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "measure", loader, str(path)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench_data.py measure {loader}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
    return json.loads(out.stdout.splitlines()[-1])


def bench_data(rows: int, workdir: Path) -> dict:
    """Both loaders on one `rows`-row file; figures per 1M rows scale the measured ones by 1M / rows."""
    path = workdir / "annotations.jsonl"
    start = time.perf_counter()
    write_corpus(path, rows)
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import _repo; from dataset.annotations import AnnotationStore as S; "
                    f"S({str(path)!r})"], check=True, cwd=Path(__file__).parent)   # the one-time build
    build_s = time.perf_counter() - start
    result = {"rows": rows, "file_mb": round(path.stat().st_size / MB, 1), "write_s": round(write_s, 1),
              "store_build_s": round(build_s, 1),
              "store_mb": round(sum(p.stat().st_size for p in (workdir / f".{path.name}.store").iterdir()) / MB, 1)}
    for loader in ("store", "jsonl"):
        result[loader] = run_measure(loader, path)
        assert result[loader]["characters"] == result["store"]["characters"]   # both read the same records
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="one loader's figures, in a fresh process (bench.py runs it)")
    p.add_argument("what", choices=["measure"])
    p.add_argument("loader", choices=["store", "jsonl"])
    p.add_argument("path")
    a = p.parse_args()
    print(json.dumps(measure(a.loader, a.path)))
