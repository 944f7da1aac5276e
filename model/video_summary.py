"""VideoSummary: per-frame CLIP features (N, T, d_clip) → K visual tokens (N, K, d), aware of frame order."""
import torch
import torch.nn as nn

from model.config import VisionConfig
from model.lm import Block, RMSNorm


class FeatureStandardiser(nn.Module):
    """Per-dimension (x - mean) / std with statistics measured on the training media.

    Frozen CLIP features share a large constant component (random towers especially: the
    sample-to-sample spread is ~10% of the magnitude), which LayerNorm cannot remove.
    The statistics are buffers, so they travel with the checkpoint.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, frames: torch.Tensor):
        """frames: (M, d) valid frame features."""
        self.mean.copy_(frames.mean(0))
        self.std.copy_(frames.std(0).clamp(min=1e-6))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class TemporalSummary(nn.Module):
    """K learned queries and the T frames (plus learned temporal position embeddings) pass through
    a small bidirectional transformer; the queries' outputs are the visual tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.summary_dim
        self.input_norm = FeatureStandardiser(cfg.clip_dim)
        self.input_proj = nn.Linear(cfg.clip_dim, d)
        self.time_embed = nn.Parameter(torch.randn(cfg.num_frames, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(cfg.num_visual_tokens, d) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d, cfg.summary_heads, cfg.summary_heads, 4 * d, 1e-5) for _ in range(cfg.summary_layers))
        self.norm = RMSNorm(d, 1e-5)

    def forward(self, frames, frame_mask):
        """frames: (N, T, d_clip); frame_mask: (N, T) bool, False where a short clip was padded."""
        N, T, _ = frames.shape
        if T > self.time_embed.shape[0]:
            raise ValueError(f"{T} frames but the model was built for {self.time_embed.shape[0]}")
        x = self.input_proj(self.input_norm(frames)) + self.time_embed[:T]
        q = self.queries.expand(N, -1, -1).to(x.dtype)
        x = torch.cat([q, x], dim=1)
        K = q.shape[1]
        keys_valid = torch.cat([frame_mask.new_ones(N, K), frame_mask], dim=1)
        mask = keys_valid[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x[:, :K])


class MeanSummary(nn.Module):
    """Ablation: the plain average of the frames (order is lost), spread over K learned slots."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_norm = FeatureStandardiser(cfg.clip_dim)
        self.input_proj = nn.Linear(cfg.clip_dim, cfg.summary_dim)
        self.slots = nn.Parameter(torch.randn(cfg.num_visual_tokens, cfg.summary_dim) * 0.02)
        self.norm = RMSNorm(cfg.summary_dim, 1e-5)

    def forward(self, frames, frame_mask):
        weights = frame_mask.to(frames.dtype).unsqueeze(-1)
        mean = (frames * weights).sum(1) / weights.sum(1).clamp(min=1)
        x = self.input_proj(self.input_norm(mean)).unsqueeze(1) + self.slots
        return self.norm(x)


def build_summary(cfg: VisionConfig) -> nn.Module:
    kinds = {"temporal": TemporalSummary, "mean": MeanSummary}
    if cfg.summary not in kinds:
        raise ValueError(f"summary must be one of {sorted(kinds)}, got {cfg.summary!r}")
    return kinds[cfg.summary](cfg)
