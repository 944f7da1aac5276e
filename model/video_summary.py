"""VideoSummary: per-frame CLIP features (N, T, d_clip) → K visual tokens (N, K, d), aware of frame order and time."""
import math

import torch
import torch.nn as nn

from model.config import VisionConfig
from model.lm import Block, RMSNorm


class FeatureStandardiser(nn.Module):
    """Per-dimension (x - mean) / std with statistics measured on the training media.

    Frozen CLIP features share a large constant component (random towers especially: the
    sample-to-sample spread is small next to the magnitude), which LayerNorm cannot remove.
    The statistics are buffers, so they travel with the checkpoint.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor):
        """features: (M, d), one row per valid frame."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


TIME_ENCODINGS = ("index", "seconds")


class SecondsEmbedding(nn.Module):
    """A frame's absolute time in seconds → a (d,) vector: sin and cos of t at geometric frequencies (periods
    from min_period to max_period seconds), then a learned linear map. Any number of frames, any time:
    a 60-s video and a 2-s clip differ in their clock, not only in their frame count."""

    def __init__(self, d: int, n_frequencies: int = 16, min_period: float = 0.5, max_period: float = 512.0):
        super().__init__()
        periods = torch.logspace(math.log10(min_period), math.log10(max_period), n_frequencies)
        self.register_buffer("omega", 2 * math.pi / periods, persistent=False)   # derived: never stored
        self.proj = nn.Linear(2 * n_frequencies, d)

    def forward(self, seconds):
        angles = seconds.unsqueeze(-1).float() * self.omega
        return self.proj(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.proj.weight.dtype))


def segment_weights(frame_mask, k: int):
    """(N, K, T) averaging weights: token k pools the k-th of K equal time segments of the valid frames.

    Clips with fewer valid frames than K repeat frames (an image, T=1, fills all K tokens).
    """
    N, T = frame_mask.shape
    counts = frame_mask.sum(1).clamp(min=1)                                   # (N,)
    t = torch.arange(T, device=frame_mask.device)
    seg = torch.arange(k, device=frame_mask.device)
    start = (seg[None] * counts[:, None]) // k                                # (N, K)
    end = torch.maximum(((seg[None] + 1) * counts[:, None]) // k, start + 1)
    inside = (t[None, None] >= start[..., None]) & (t[None, None] < end[..., None])
    weights = inside.float()
    return weights / weights.sum(-1, keepdim=True)


class TemporalSummary(nn.Module):
    """Two streams, appearance (each frame's features) and motion (each frame's change from the previous
    one), with learned temporal position embeddings, pass together through a small bidirectional
    transformer; each stream is then pooled over K/2 consecutive time segments. The K visual
    tokens are in time order by construction, and motion has tokens of its own.

    Why: left vs right (or appear vs leave) visit the same frames in another order, so whatever
    averages over time cancels them, and the LM starts out averaging (uniform attention). Learned
    queries over frames start as a mean pool too; with motion folded into shared tokens,
    appearance (colour, shape) dominates them and direction stayed at chance in mixed training
    (docs/findings.md).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.num_visual_tokens % 2:
            raise ValueError("the temporal summary needs an even num_visual_tokens (appearance + motion)")
        d = cfg.summary_dim
        self.k = cfg.num_visual_tokens // 2
        self.input_norm = FeatureStandardiser(cfg.clip_dim)
        self.input_proj = nn.Linear(cfg.clip_dim, d)
        self.motion_norm = RMSNorm(cfg.clip_dim, 1e-3)   # frame changes are small: bring them to content scale
        self.motion_proj = nn.Linear(cfg.clip_dim, d)
        if cfg.time_encoding == "seconds":
            self.seconds_embed = SecondsEmbedding(d)
        else:   # "index": a learned vector per frame position, at most num_frames of them
            # At about the scale of the projected features, so tokens know their time from step 0.
            self.time_embed = nn.Parameter(torch.randn(cfg.num_frames, d) * 0.5)
        self.stream_embed = nn.Parameter(torch.randn(2, d) * 0.5)
        self.blocks = nn.ModuleList(
            Block(d, cfg.summary_heads, cfg.summary_heads, 4 * d, 1e-5) for _ in range(cfg.summary_layers))
        self.norm = RMSNorm(d, 1e-5)

    def frame_time(self, frame_mask, frame_times):
        """The time embedding of every frame: (N, T, d) from seconds, or (T, d) by position."""
        T = frame_mask.shape[1]
        if hasattr(self, "seconds_embed"):
            if frame_times is None or bool(torch.isnan(frame_times[frame_mask]).any()):
                raise ValueError("this model reads each frame's time in seconds, and some are unknown")
            return self.seconds_embed(torch.nan_to_num(frame_times))
        if T > self.time_embed.shape[0]:
            raise ValueError(f"{T} frames but the model was built for {self.time_embed.shape[0]}")
        return self.time_embed[:T]

    def forward(self, features, frame_mask, frame_times=None):
        """features: (N, T, d_clip); frame_mask: (N, T) bool, False where a short clip was padded;
        frame_times: (N, T) seconds (read with time_encoding "seconds", NaN allowed on padding)."""
        N, T, _ = features.shape
        time = self.frame_time(frame_mask, frame_times)
        x = self.input_norm(features)
        motion = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
        has_previous = torch.cat([torch.zeros_like(frame_mask[:, :1]), frame_mask[:, 1:]], dim=1)
        motion = motion * has_previous[..., None].to(x.dtype)   # padding sits at the end
        h = torch.cat([self.input_proj(x) + time + self.stream_embed[0],
                       self.motion_proj(self.motion_norm(motion)) + time + self.stream_embed[1]], dim=1)
        mask = torch.cat([frame_mask, frame_mask], dim=1)[:, None, None, :]
        for block in self.blocks:
            h = block(h, mask=mask)
        pool = segment_weights(frame_mask, self.k).to(h.dtype)
        tokens = torch.cat([pool @ h[:, :T], pool @ h[:, T:]], dim=1)
        return self.norm(tokens)


class MeanSummary(nn.Module):
    """Ablation: the plain average of the frames (order is lost), spread over K learned slots."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_norm = FeatureStandardiser(cfg.clip_dim)
        self.input_proj = nn.Linear(cfg.clip_dim, cfg.summary_dim)
        self.slots = nn.Parameter(torch.randn(cfg.num_visual_tokens, cfg.summary_dim) * 0.02)
        self.norm = RMSNorm(cfg.summary_dim, 1e-5)

    def forward(self, features, frame_mask, frame_times=None):   # time is what this ablation lacks
        weights = frame_mask.to(features.dtype).unsqueeze(-1)
        mean = (features * weights).sum(1) / weights.sum(1).clamp(min=1)
        x = self.input_proj(self.input_norm(mean)).unsqueeze(1) + self.slots
        return self.norm(x)


def build_summary(cfg: VisionConfig) -> nn.Module:
    kinds = {"temporal": TemporalSummary, "mean": MeanSummary}
    if cfg.summary not in kinds:
        raise ValueError(f"summary must be one of {sorted(kinds)}, got {cfg.summary!r}")
    if cfg.time_encoding not in TIME_ENCODINGS:
        raise ValueError(f"time_encoding must be one of {TIME_ENCODINGS}, got {cfg.time_encoding!r}")
    return kinds[cfg.summary](cfg)
