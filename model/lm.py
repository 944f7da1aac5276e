"""The decoder-only language model: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache."""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32: bf16 mean-of-squares loses too much precision. (The dtype tests skip
        # no-op calls: a generation step is a few hundred tiny ops, each paying Python's overhead.)
        h = x if x.dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h * (self.weight if self.weight.dtype == torch.float32 else self.weight.float())
        return h if h.dtype == x.dtype else h.to(x.dtype)


def rope_table(head_dim: int, max_len: int, theta: float):
    """cos/sin of shape (max_len, head_dim) in the half-split (rotate_half) layout used by HF Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def signed_sin(sin):
    """sin with rotate_half's sign folded in, for apply_rope: -sin on the first half, sin on the second."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x, cos, sin_signed):
    """x: (B, L, H, D); cos/sin_signed: (B or 1, L, 1, D).

    x·cos + rotate_half(x)·sin, where rotate_half(x) = [-x2, x1]: rolling x by half a head gives
    [x2, x1], and signed_sin puts the minus on sin, so one roll replaces slice, slice, neg and cat.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


class KVCache:
    """Preallocated keys/values for every layer; generation writes in place instead of concatenating."""

    def __init__(self, cfg: LMConfig, batch: int, max_len: int, device, dtype):
        head_dim = cfg.hidden_size // cfg.num_heads
        shape = (batch, cfg.num_kv_heads, max_len, head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0   # positions filled so far (same for every layer)
        self.max_len = max_len

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} > {self.max_len} positions")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def segment_spans(segments) -> list:
    """(row, start, end) of each conversation in a packed batch (segments: (B, L), 0 for padding)."""
    spans = []
    for row, ids in enumerate(segments.cpu()):
        values, counts = torch.unique_consecutive(ids, return_counts=True)
        start = 0
        for value, count in zip(values.tolist(), counts.tolist()):
            if value:
                spans.append((row, start, start + count))
            start += count
    return spans


def segment_mask(segments):
    """(B, 1, L, L) bool: causal, and only within a query's own segment (padding, 0, sees padding: finite,
    never scored)."""
    L = segments.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segments.device).tril()
    return causal & (segments[:, None, :, None] == segments[:, None, None, :])


def span_attention(q, k, v, spans, dropout_p: float, gqa: bool):
    """Causal attention inside each (row, start, end) span, zeros elsewhere (padding). One call per span
    costs the sum of the spans' squared lengths, where one masked call over a packed row costs the
    square of its width, most of it on pairs the mask then throws away."""
    rows = [[] for _ in range(q.shape[0])]
    for row, start, end in spans:
        rows[row].append(F.scaled_dot_product_attention(
            q[row:row + 1, :, start:end], k[row:row + 1, :, start:end], v[row:row + 1, :, start:end],
            is_causal=True, dropout_p=dropout_p, enable_gqa=gqa))
    width = q.shape[2]
    for parts in rows:
        filled = sum(p.shape[2] for p in parts)
        if filled < width:
            parts.append(q.new_zeros(1, q.shape[1], width - filled, q.shape[3]))
    return torch.cat([torch.cat(parts, dim=2) for parts in rows])


def is_plain_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is None and not (module._forward_hooks or module._forward_pre_hooks)


def project(module, x):
    """module(x) for a bias-free projection, as F.linear when it is a plain nn.Linear: a generation
    step of a small model is a few hundred tiny ops, and a module call costs as much as one."""
    return F.linear(x, module.weight) if is_plain_linear(module) else module(x)


class JointProjections(nn.Module):
    """Base of modules that send one input through several bias-free projections.

    They run as one matmul on the concatenated weights (fewer, larger matmuls are faster); the
    weights stay separate parameters, so checkpoint keys do not change. Inside
    LanguageModel.frozen_weights() the concatenation is made once instead of per call. A
    projection that is not a plain nn.Linear (a LoRA wrapper, a hooked module) runs on its own.
    """
    joined = None   # the concatenated weight while frozen

    def projections(self) -> list:
        raise NotImplementedError

    def joint(self, x):
        if self.joined is not None:
            return F.linear(x, self.joined)
        parts = self.projections()
        if all(is_plain_linear(p) for p in parts):
            return F.linear(x, torch.cat([p.weight for p in parts]))
        return torch.cat([p(x) for p in parts], dim=-1)

    @torch.no_grad()
    def freeze_joined(self, frozen: bool):
        parts = self.projections()
        self.joined = torch.cat([p.weight for p in parts]) if frozen and all(map(is_plain_linear, parts)) else None


class Attention(JointProjections):
    """Multi-head attention with grouped KV heads, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0,
                 qk_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        if dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"dim {dim}, heads {num_heads}, kv heads {num_kv_heads} do not divide")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.dropout = dropout
        # Off by default: without it the module has no norm weights, so existing checkpoints load unchanged.
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, x, rope=None, mask=None, causal=False, cache=None, layer=0):
        """mask: an additive (B, 1, L, keys) mask, or a packed batch's spans (segment_spans)."""
        B, L, _ = x.shape
        H, KV = self.num_heads, self.num_kv_heads
        qkv = self.joint(x).view(B, L, H + 2 * KV, self.head_dim)
        qk, v = qkv[:, :, :H + KV], qkv[:, :, H + KV:]
        if self.qk_norm:   # each head's q and k normalised before RoPE, as minimind-3 and Qwen3 do
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        if rope is not None:   # q and k rotate together, in one pass
            qk = apply_rope(qk, *rope)
        q, k = qk.split([H, KV], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.dropout if self.training else 0.0
        if isinstance(mask, list):
            out = span_attention(q, k, v, mask, dropout_p, KV != H)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                 dropout_p=dropout_p, enable_gqa=KV != H)
        return project(self.o_proj, out.transpose(1, 2).reshape(B, L, -1))

    def projections(self):
        return [self.q_proj, self.k_proj, self.v_proj]


class SwiGLU(JointProjections):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.joint(x).chunk(2, dim=-1)
        return project(self.down_proj, F.silu(gate) * up)

    def projections(self):
        return [self.gate_proj, self.up_proj]


class Block(nn.Module):
    """Pre-norm transformer block; causal with RoPE in the LM, bidirectional in VideoSummary."""

    def __init__(self, dim, num_heads, num_kv_heads, hidden, eps, dropout=0.0, qk_norm=False):
        super().__init__()
        self.input_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, dropout, qk_norm, eps)
        self.post_attn_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, rope=None, mask=None, causal=False, cache=None, layer=0):
        x = x + self.attn(self.input_norm(x), rope, mask, causal, cache, layer)
        return x + self.mlp(self.post_attn_norm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
                  cfg.norm_eps, cfg.dropout, cfg.qk_norm) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight   # tied
        cos, sin = rope_table(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", signed_sin(sin), persistent=False)   # signed for apply_rope
        # Gradient checkpointing (trainer --grad_checkpointing): each block's activations are
        # recomputed in the backward pass instead of kept, so memory grows with one block, not all.
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        # Residual-branch outputs start small so a deep stack begins near the identity.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.num_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    @contextmanager
    def frozen_weights(self):
        """For generation, where no weight changes: joint projection weights are concatenated once."""
        joint = [m for m in self.modules() if isinstance(m, JointProjections)]
        for m in joint:
            m.freeze_joined(True)
        try:
            yield
        finally:
            for m in joint:
                m.freeze_joined(False)

    def forward(self, inputs_embeds, position_ids=None, attention_mask=None, cache=None, last_only=False):
        """Input embeddings → logits (of the last position only with last_only: a prompt needs no others)."""
        x = self.hidden(inputs_embeds, position_ids, attention_mask, cache)
        return self.logits(x[:, -1:] if last_only else x)

    def logits(self, hidden):
        """The last block's hidden states (any leading shape) → logits."""
        return project(self.lm_head, self.norm(hidden))

    def hidden(self, inputs_embeds, position_ids=None, attention_mask=None, cache=None, segments=None):
        """Input embeddings → the last block's hidden states (before the final norm).

        position_ids: (B, L) absolute positions (below max_seq_len); default 0..L-1 after what the cache holds.
        attention_mask: (B, Lk) bool, False for padding keys (left-padded batched generation).
        segments: (B, L) which conversation of a packed row each position is (dataset/packing.py): a
        query sees only keys of its own (on a CPU attended span by span; training only: no cache, no
        attention_mask).
        Without padding, packing and cache the fast causal path is used.
        """
        B, L, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if past + L > self.cfg.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.cfg.max_seq_len}")
        dtype, device = inputs_embeds.dtype, inputs_embeds.device
        if position_ids is None:   # the same positions for every row: a slice, no gather
            rope = (self.rope_cos[past:past + L, None].to(dtype), self.rope_sin[past:past + L, None].to(dtype))
        else:
            rope = (self.rope_cos[position_ids].unsqueeze(2).to(dtype),
                    self.rope_sin[position_ids].unsqueeze(2).to(dtype))
        mask = None
        if L == 1 and past > 0:
            # One new query per row (a generation step) sees every cached key, so only padding is
            # masked; its own key always counts (as `itself` below).
            if attention_mask is not None:
                mask = attention_mask[:, None, None, :past + 1].clone()
                mask[..., past] = True
        elif segments is not None:
            if attention_mask is not None or past > 0:
                raise ValueError("packed rows (segments) take no attention_mask and no cache")
            # Span by span where it was measured faster (CPU); on an accelerator one masked kernel per
            # layer is kept, as many small launches may cost more than the pairs they skip (unmeasured).
            mask = segment_spans(segments) if device.type == "cpu" else segment_mask(segments)
        elif attention_mask is not None or past > 0:
            keys = past + L
            causal = torch.ones(L, keys, dtype=torch.bool, device=device).tril(past)
            mask = causal.expand(B, 1, L, keys)
            if attention_mask is not None:
                # A padding query sees no valid key; letting every query see itself keeps
                # softmax finite (an all-masked row is NaN, and NaN * 0 poisons later rows).
                itself = torch.zeros_like(causal)
                itself[:, past:] = torch.eye(L, dtype=torch.bool, device=device)
                mask = (mask & attention_mask[:, None, None, :keys]) | itself
        if isinstance(mask, torch.Tensor):   # additive, once: SDPA would convert a bool mask in every layer
            mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
        x = inputs_embeds
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:   # the RNG state is replayed, so dropout masks match the first pass
                x = checkpoint(layer, x, rope, mask, mask is None and past == 0, use_reentrant=False)
            else:
                x = layer(x, rope, mask, causal=mask is None and past == 0, cache=cache, layer=i)
        if cache is not None:
            cache.length += L
        return x
