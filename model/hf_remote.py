"""The whole video model behind transformers' AutoModel (trust_remote_code=True): the modeling file of an exported folder.

scripts/export_hf.py copies this file into the folder as modeling_tiny_video_llm.py, beside every repository
module it imports (flattened, their imports made relative: model/hf_bundle.py), so the folder runs without
the repository. The folder's config.json stays a plain Llama config (AutoModelForCausalLM gives the language
model alone); its `auto_map` sends AutoModel here, and its `video_llm` block names the files read below.

    model = AutoModel.from_pretrained("out/hf_sft_video_32", trust_remote_code=True)
    model.chat("Describe the video.", video="clip.mp4")
"""
from pathlib import Path

from transformers import AutoConfig, LlamaConfig, PreTrainedModel

from model.engine import Engine, SamplingOptions

CONFIG_KEY = "video_llm"                   # config.json's block: {"checkpoint", "vision_tower", "vision_config_file"}
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


def local_folder(name_or_path, kwargs) -> Path:
    """The folder itself, or a Hub repo id's snapshot (downloaded by huggingface_hub, as transformers does)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(str(name_or_path), **{k: kwargs[k] for k in HUB_KWARGS if k in kwargs}))


class TinyVideoLLM(PreTrainedModel):
    """The trained video LLM (language model, VideoSummary, projector) with its frozen CLIP tower and
    tokenizer: `chat` answers a question about a video or an image as the repository's eval.py does."""
    config_class = LlamaConfig
    base_model_prefix = "video_llm"

    def __init__(self, config, engine=None):
        super().__init__(config)
        self.engine = engine
        self.video_llm = engine.model if engine is not None else None   # a submodule: .to() and .parameters() reach it

    @classmethod
    def from_pretrained(cls, name_or_path, *args, config=None, device="cpu", **kwargs):
        """Load the folder's checkpoint (safetensors, no pickle), tokenizer and vision tower: the tower is
        the weights file the folder carries, or an open_clip pretrained tag that open_clip downloads."""
        folder = local_folder(name_or_path, kwargs)
        config = config or AutoConfig.from_pretrained(str(folder))   # Llama, or Qwen3 for an LM with q/k norms
        files = getattr(config, CONFIG_KEY, None)
        if not isinstance(files, dict) or "checkpoint" not in files:
            raise ValueError(f"{folder}: config.json has no {CONFIG_KEY!r} block (export it with scripts/export_hf.py)")
        if files.get("vision_config_file"):   # an architecture open_clip does not ship (the offline stand-ins)
            import open_clip
            open_clip.add_model_config(folder / files["vision_config_file"])
        tower = files["vision_tower"]
        if (folder / tower).is_file():
            tower = str(folder / tower)
        engine = Engine.load(weight=str(folder / files["checkpoint"]), tokenizer=str(folder), clip_pretrained=tower,
                             device=device)
        return cls(config, engine).eval()

    def chat(self, prompt: str, video=None, image=None, max_new_tokens=64, temperature=0.0, top_p=0.9, seed=0) -> str:
        """The answer to one question about a video and/or an image file (paths; neither for text only);
        temperature 0 is greedy, equal to `eval.py --prompt ... --temperature 0`."""
        device = next(self.video_llm.parameters()).device
        if device != self.engine.device:   # the model was moved with .to() / .cuda()
            self.engine.to(device)
        media, markers = self.engine.read_attachments(image=image, video=video)
        options = SamplingOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return self.engine.reply([{"role": "user", "content": markers + prompt}], media, options)
