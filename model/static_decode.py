"""Decoding steps at static shapes, for torch.compile: the whole preallocated cache is attended under a key mask.

An eager decoding step of a small model is mostly per-op overhead (docs/performance.md). Compiled, the
step becomes a few fused kernels, but only if its shapes never change: so the cache is not sliced to
the positions filled so far; each step attends to all of it, with an additive mask that is -inf on the
positions not yet written (and on left padding), and writes its key and value at a position given as a
tensor. One graph serves a whole answer, and every answer with the same batch size and cache size
(rounded up to STATIC_BUCKET). Masked keys add exact zeros to the softmax, so the tokens stay those of
the eager path (tests/test_static_decode.py).
"""
import sys

import torch

from model.lm import KVCache

STATIC_BUCKET = 128   # cache sizes are rounded up to a multiple of this, so prompts of alike length share a graph


def static_size(total: int, max_seq_len: int) -> int:
    return min(-(-total // STATIC_BUCKET) * STATIC_BUCKET, max_seq_len)


class StaticKVCache(KVCache):
    """A KVCache whose decoding steps write at `slot` (a tensor) and hand back the whole buffers; the
    prompt's prefill still goes through KVCache.update."""
    slot = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for buffer in self.keys + self.values:   # unwritten positions are read (and masked): never NaN garbage
            buffer.zero_()

    def update(self, layer: int, k, v):
        if self.slot is None:
            return super().update(layer, k, v)
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]


def decode_step(lm, cache: StaticKVCache, embeds, positions, slot, key_bias):
    """One token per row (embeds (B, 1, d)) at rope `positions` (B, 1), written at cache position `slot`
    (1,); key_bias (B, 1, 1, size) is opened at `slot` in place. → logits (B, vocab)."""
    key_bias.index_fill_(-1, slot, 0.0)
    rope = (lm.rope_cos[positions].unsqueeze(2).to(embeds.dtype), lm.rope_sin[positions].unsqueeze(2).to(embeds.dtype))
    cache.slot = slot
    x = embeds
    for i, layer in enumerate(lm.layers):
        x = layer(x, rope, key_bias, causal=False, cache=cache, layer=i)
    return lm.logits(x)[:, -1]


class CompiledSteps:
    """decode_step through torch.compile (CUDA graphs on a GPU), built on first use; if compiling fails
    (no C++ compiler, an unsupported backend) it says so in one line and runs the same step eagerly."""

    def __init__(self, lm):
        self.lm = lm
        mode = "reduce-overhead" if next(lm.parameters()).is_cuda else None
        self.compiled = torch.compile(decode_step, dynamic=False, mode=mode)
        self.failed = False

    def __call__(self, cache, embeds, positions, slot, key_bias):
        if not self.failed:
            try:
                return self.compiled(self.lm, cache, embeds, positions, slot, key_bias)
            except Exception as e:   # torch._dynamo / inductor errors have no common public base class
                self.failed = True
                first = (str(e).strip().splitlines() or [""])[0][:200]
                print(f"warning: compiled decoding failed ({type(e).__name__}: {first}); decoding eagerly",
                      file=sys.stderr)
        return decode_step(self.lm, cache, embeds, positions, slot, key_bias)
