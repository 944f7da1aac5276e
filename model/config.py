"""The two config dataclasses: the language model's shape and the vision path's shape."""
from dataclasses import asdict, dataclass, fields


@dataclass
class LMConfig:
    """A Llama-style decoder. Defaults are MiniMind2-small, so its base weights can be loaded."""
    vocab_size: int = 6400
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 1408
    max_seq_len: int = 2048          # RoPE table length; generation stops here
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    dropout: float = 0.0
    qk_norm: bool = False            # per-head RMSNorm of q and k before RoPE (minimind-3, Qwen3)


MAX_REGIONS = 8   # clip_regions: at most 8 x 8 cells a frame


@dataclass
class VisionConfig:
    """Frozen open_clip encoder → VideoSummary → projector; how many frames and visual tokens."""
    clip_model: str = "ViT-S-32"    # open_clip architecture name
    clip_pretrained: str = ""        # open_clip pretrained tag, or a local weights file
    clip_image_size: int = 0         # 0 keeps the architecture's own input size
    clip_regions: int = 0            # 0: a frame is its pooled CLS; g > 0: also its patch tokens averaged over a
                                     # g x g grid of regions (the frame's feature: 1 + g*g vectors, side by side)
    clip_dim: int = 384              # width of one frame's feature (set from the encoder: (1 + g*g) * output width)
    num_frames: int = 8              # frames sampled per video, identical in training and eval
    frame_sampling: str = "uniform"  # "uniform" over the clip, or "fps": sample_fps a second, at most num_frames
    sample_fps: float = 0.0          # the rate for "fps" sampling (dataset/media.py sample_frames)
    summary: str = "temporal"        # "temporal" (sees frame order) or "mean" (ablation)
    time_encoding: str = "index"     # temporal summary: "index" (learned, per frame position), "seconds" (absolute
                                     # time) or "none" (an ablation: token order only)
    num_visual_tokens: int = 8       # K tokens per image or video handed to the LM (with segment_seconds: the cap)
    segment_seconds: float = 0.0     # 0: K per media; > 0: 2 per time segment this long (the budget grows with duration)
    timestamp_text: bool = False     # with segment_seconds: each segment's tokens follow its start second as text (" 37")
    summary_dim: int = 256
    summary_layers: int = 2
    summary_heads: int = 4
    vision_token_id: int = 3         # the tokenizer's <|vision_pad|> id: slots the visual tokens fill

    @property
    def reads_frame_times(self) -> bool:
        """Whether the model reads each frame's time in seconds, to embed it or to cut time segments (so
        media without a clock cannot be used)."""
        return self.summary == "temporal" and self.time_encoding == "seconds" or self.segment_seconds > 0


def config_to_dict(cfg) -> dict:
    return asdict(cfg)


def config_from_dict(cls, values: dict):
    """Build a config from a dict; unknown keys are an error, not silently dropped."""
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**values)
