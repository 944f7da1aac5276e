"""The decoder-only language model: RMSNorm, RoPE, grouped-query attention, SwiGLU, KV cache."""
import math

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
        # Normalise in fp32: bf16 mean-of-squares loses too much precision.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rope_table(head_dim: int, max_len: int, theta: float):
    """cos/sin of shape (max_len, head_dim) in the half-split (rotate_half) layout used by HF Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x: (B, H, L, D); cos/sin: (B, 1, L, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


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


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, dropout: float = 0.0):
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

    def forward(self, x, rope=None, mask=None, causal=False, cache=None, layer=0):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; causal with RoPE in the LM, bidirectional in VideoSummary."""

    def __init__(self, dim, num_heads, num_kv_heads, hidden, eps, dropout=0.0):
        super().__init__()
        self.input_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, dropout)
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
                  cfg.norm_eps, cfg.dropout) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight   # tied
        cos, sin = rope_table(cfg.hidden_size // cfg.num_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
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

    def forward(self, inputs_embeds, position_ids=None, attention_mask=None, cache=None):
        """Hidden states → logits.

        position_ids: (B, L) absolute positions; default 0..L-1 after what the cache holds.
        attention_mask: (B, Lk) bool, False for padding keys (left-padded batched generation).
        Without padding and cache the fast causal path is used.
        """
        B, L, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=inputs_embeds.device).expand(B, L)
        if int(position_ids.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.cfg.max_seq_len}")
        rope = (self.rope_cos[position_ids].unsqueeze(1).to(inputs_embeds.dtype),
                self.rope_sin[position_ids].unsqueeze(1).to(inputs_embeds.dtype))
        mask = None
        if attention_mask is not None or past > 0:
            keys = past + L
            causal = torch.ones(L, keys, dtype=torch.bool, device=inputs_embeds.device).tril(past)
            mask = causal.expand(B, 1, L, keys)
            if attention_mask is not None:
                # A padding query sees no valid key; letting every query see itself keeps
                # softmax finite (an all-masked row is NaN, and NaN * 0 poisons later rows).
                itself = torch.zeros_like(causal)
                itself[:, past:] = torch.eye(L, dtype=torch.bool, device=causal.device)
                mask = (mask & attention_mask[:, None, None, :keys]) | itself
        x = inputs_embeds
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            if recompute:   # the RNG state is replayed, so dropout masks match the first pass
                x = checkpoint(layer, x, rope, mask, mask is None, use_reentrant=False)
            else:
                x = layer(x, rope, mask, causal=mask is None, cache=cache, layer=i)
        if cache is not None:
            cache.length += L
        return self.lm_head(self.norm(x))
