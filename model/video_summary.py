"""VideoSummary: per-frame CLIP features (N, T, d_clip) → K visual tokens (N, K, d), aware of frame order and time."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.chat import MediaSlots
from model.config import MAX_REGIONS, VisionConfig
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


TIME_ENCODINGS = ("index", "seconds", "none")
TIME_SLACK = 1e-3   # frame times are stored rounded: a frame on a segment boundary falls in the later segment


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


def segment_plan(frame_mask, frame_times, seconds: float, max_segments: int, with_clock: bool = False):
    """Each frame's time segment, (N, T) long, and the segments of each media, (N,); with_clock also the
    (N,) first-frame time and (N,) segment length, in seconds, so segment k starts at first + k · length.

    Segments are `seconds` long from the first frame on, longer where a media would need more than
    max_segments: the token budget grows with duration up to a cap. A media whose times are not all
    known (NaN, or none given) is timed by frame index, one frame per segment.
    """
    N, T = frame_mask.shape
    index_clock = (torch.arange(T, device=frame_mask.device) * seconds).expand(N, T)
    if frame_times is None:
        times = index_clock
    else:
        known = (torch.isfinite(frame_times) | ~frame_mask).all(1, keepdim=True)
        times = torch.where(known, frame_times.float(), index_clock)
    elapsed = torch.where(frame_mask, times - times[:, :1], torch.zeros_like(times)).clamp(min=0)
    span = elapsed.amax(1, keepdim=True)
    length = torch.maximum(torch.full_like(span, seconds), span / (max_segments - 1e-6))
    segment = torch.floor(elapsed / length + TIME_SLACK).long().clamp(0, max_segments - 1)
    segment = segment.masked_fill(~frame_mask, 0)
    if with_clock:
        return segment, segment.amax(1) + 1, times[:, 0], length[:, 0]
    return segment, segment.amax(1) + 1


def visual_token_counts(cfg: VisionConfig, frame_mask, frame_times=None):
    """(N,) visual tokens of each media: num_visual_tokens, or with segment_seconds two per time segment
    (appearance and motion), at most num_visual_tokens."""
    if not cfg.segment_seconds:
        return torch.full((frame_mask.shape[0],), cfg.num_visual_tokens, dtype=torch.long, device=frame_mask.device)
    return 2 * segment_plan(frame_mask, frame_times, cfg.segment_seconds, cfg.num_visual_tokens // 2)[1]


def media_token_count(cfg: VisionConfig, n_frames: int, times=None) -> int:
    """The visual tokens (the text's slots) of one media of n_frames frames at `times` seconds (or unknown)."""
    mask = torch.ones(1, n_frames, dtype=torch.bool)
    return int(visual_token_counts(cfg, mask, None if times is None else torch.as_tensor(times).reshape(1, -1))[0])


def media_stamps(cfg: VisionConfig, n_frames: int, times) -> tuple:
    """The start second of each time segment of one media, for the time text before its tokens; None when
    its times are unknown or it is a single frame (an image has no timeline)."""
    if times is None or n_frames < 2 or not bool(torch.isfinite(torch.as_tensor(times)).all()):
        return None
    mask = torch.ones(1, n_frames, dtype=torch.bool)
    _, counts, first, length = segment_plan(mask, torch.as_tensor(times).reshape(1, -1), cfg.segment_seconds,
                                            cfg.num_visual_tokens // 2, with_clock=True)
    return tuple(float(first[0] + k * length[0]) for k in range(int(counts[0])))


def media_slot_counts(cfg: VisionConfig, media):
    """The slots the text gives each media (items with .values, one row per frame, and .times), in
    order, as the datasets and the engine size them: counts, or with timestamp_text MediaSlots whose
    groups follow their start second; None when every media gets num_visual_tokens."""
    if not cfg.segment_seconds:
        return None
    if not cfg.timestamp_text:
        return [media_token_count(cfg, len(m.values), m.times) for m in media]
    slots = []
    for m in media:   # a stamped media's segments give its count: one segment_plan per media, not two
        stamps = media_stamps(cfg, len(m.values), m.times)
        slots.append(MediaSlots(2 * len(stamps) if stamps else media_token_count(cfg, len(m.values), m.times), stamps))
    return slots


def segment_pool(frame_mask, frame_times, seconds: float, max_segments: int):
    """(N, S, T) averaging weights over each time segment's frames (S the most segments in the batch) and
    the (N, S) mask of the segments each media has."""
    segment, counts = segment_plan(frame_mask, frame_times, seconds, max_segments)
    S = int(counts.max())
    weights = F.one_hot(segment, S).transpose(1, 2).float() * frame_mask[:, None, :].float()
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)   # a segment without frames pools nothing
    return weights, torch.arange(S, device=counts.device)[None] < counts[:, None]


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
        self.segment_seconds = cfg.segment_seconds
        if cfg.time_encoding == "seconds":
            self.seconds_embed = SecondsEmbedding(d)
        elif cfg.time_encoding == "index":   # a learned vector per frame position, at most num_frames of them
            # At about the scale of the projected features, so tokens know their time from step 0.
            self.time_embed = nn.Parameter(torch.randn(cfg.num_frames, d) * 0.5)
        # "none" (an ablation): frames carry no time; only the order of the tokens is left
        self.stream_embed = nn.Parameter(torch.randn(2, d) * 0.5)
        self.blocks = nn.ModuleList(
            Block(d, cfg.summary_heads, cfg.summary_heads, 4 * d, 1e-5) for _ in range(cfg.summary_layers))
        self.norm = RMSNorm(d, 1e-5)

    def frame_time(self, frame_mask, frame_times):
        """The time embedding of every frame: (N, T, d) from seconds, (T, d) by position, or 0 (none)."""
        T = frame_mask.shape[1]
        if hasattr(self, "seconds_embed"):
            if frame_times is None or bool(torch.isnan(frame_times[frame_mask]).any()):
                raise ValueError("this model reads each frame's time in seconds, and some are unknown")
            return self.seconds_embed(torch.nan_to_num(frame_times))
        if not hasattr(self, "time_embed"):
            return 0.0
        if T > self.time_embed.shape[0]:
            raise ValueError(f"{T} frames but the model was built for {self.time_embed.shape[0]}")
        return self.time_embed[:T]

    def forward(self, features, frame_mask, frame_times=None):
        """features: (N, T, d_clip); frame_mask: (N, T) bool, False where a short clip was padded;
        frame_times: (N, T) seconds (read with time_encoding "seconds" and segment_seconds, NaN allowed on
        padding). Returns (tokens (N, K, d), token_mask (N, K) or None): see pool."""
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
        return self.pool(h, frame_mask, frame_times)

    def pool(self, h, frame_mask, frame_times):
        """(tokens, token_mask): K/2 appearance then K/2 motion tokens over equal frame segments, or with
        segment_seconds an (appearance, motion) pair per time segment, in time order (token_mask marks
        the pairs each media has; None when every media has all K)."""
        T = frame_mask.shape[1]
        if not self.segment_seconds:
            pool = segment_weights(frame_mask, self.k).to(h.dtype)
            return self.norm(torch.cat([pool @ h[:, :T], pool @ h[:, T:]], dim=1)), None
        pool, present = segment_pool(frame_mask, frame_times, self.segment_seconds, self.k)
        pool = pool.to(h.dtype)
        pairs = torch.stack([pool @ h[:, :T], pool @ h[:, T:]], dim=2)   # (N, S, 2, d)
        return self.norm(pairs.flatten(1, 2)), present.repeat_interleave(2, dim=1)


class MeanSummary(nn.Module):
    """Ablation: the plain average of the frames (order is lost), spread over K learned slots."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.input_norm = FeatureStandardiser(cfg.clip_dim)
        self.input_proj = nn.Linear(cfg.clip_dim, cfg.summary_dim)
        self.slots = nn.Parameter(torch.randn(cfg.num_visual_tokens, cfg.summary_dim) * 0.02)
        self.norm = RMSNorm(cfg.summary_dim, 1e-5)
        self.cfg = cfg

    def forward(self, features, frame_mask, frame_times=None):
        """As TemporalSummary's: with segment_seconds, as many tokens as it would give (the same budget),
        all of the same average; time is what this ablation lacks."""
        weights = frame_mask.to(features.dtype).unsqueeze(-1)
        mean = (features * weights).sum(1) / weights.sum(1).clamp(min=1)
        x = self.norm(self.input_proj(self.input_norm(mean)).unsqueeze(1) + self.slots)
        if not self.cfg.segment_seconds:
            return x, None
        counts = visual_token_counts(self.cfg, frame_mask, frame_times)
        K = int(counts.max())
        return x[:, :K], torch.arange(K, device=counts.device)[None] < counts[:, None]


SUMMARIES = {"temporal": TemporalSummary, "mean": MeanSummary}


def check_summary_config(cfg: VisionConfig):
    """ValueError (one line) for summary settings no VideoSummary can be built from."""
    if cfg.summary not in SUMMARIES:
        raise ValueError(f"summary must be one of {sorted(SUMMARIES)}, got {cfg.summary!r}")
    if not cfg.segment_seconds >= 0:
        raise ValueError(f"segment_seconds must be >= 0 (0: a fixed num_visual_tokens), got {cfg.segment_seconds}")
    if cfg.timestamp_text and not cfg.segment_seconds:
        raise ValueError("timestamp_text writes each time segment's start second: it needs segment_seconds > 0")
    if cfg.time_encoding not in TIME_ENCODINGS:
        raise ValueError(f"time_encoding must be one of {TIME_ENCODINGS}, got {cfg.time_encoding!r}")
    if not 0 <= cfg.clip_regions <= MAX_REGIONS:   # it sets the width of the features the summary reads
        raise ValueError(f"clip_regions must be 0..{MAX_REGIONS} (regions a side), got {cfg.clip_regions}")


def build_summary(cfg: VisionConfig) -> nn.Module:
    check_summary_config(cfg)
    return SUMMARIES[cfg.summary](cfg)
