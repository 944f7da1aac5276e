"""Export one of our checkpoints as a Hugging Face folder (the LM as LlamaForCausalLM or Qwen3ForCausalLM, the whole
video model behind AutoModel with trust_remote_code, tokenizer, model card) and, with --push_to_hub, upload it."""
import argparse
import json
import sys
from pathlib import Path

from _repo import ROOT
from model.chat import TokenizerError, load_tokenizer
from model.checkpoint import CheckpointError, find_checkpoint
from model.config import config_to_dict
from model.convert import ConversionError, hf_architecture, read_ours, save_hf_folder
from model.hf_bundle import CHECKPOINT_FILE as VIDEO_MODEL_FILE, write_video_model
MAX_STAGES = 10                              # how far the card follows `source` back through earlier stages


class ExportError(Exception):
    """Export or upload that cannot go on; one line naming what is missing."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weight", required=True, help="our checkpoint (path or a name in --out_dir), or an LM file")
    p.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, tokenizer files, README.md)")
    p.add_argument("--out_dir", default="out", help="where --weight names are looked up")
    p.add_argument("--tokenizer", default=None, help="default: the one the checkpoint names")
    p.add_argument("--clip_pretrained", default=None,
                   help="vision weights for the exported video model: a local file (copied in as safetensors) or "
                        "an open_clip tag (default: the ones the checkpoint names)")
    p.add_argument("--metrics", default=None,
                   help="eval metrics json for the card (default: <out_dir>/metrics.json if it names this checkpoint)")
    p.add_argument("--push_to_hub", default=None, metavar="REPO_ID", help="upload the folder to this Hub repo (user/name)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the one `hf auth login` stored)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model card

def metadata_of(path) -> dict:
    from model.weights_io import read_safetensors_metadata
    return read_safetensors_metadata(path)


def stage_chain(path: Path) -> list:
    """[(checkpoint path, its metadata)] from this checkpoint back through the `source` each stage started from."""
    chain, seen = [], set()
    while (path is not None and path.suffix == ".safetensors" and path.is_file() and len(chain) < MAX_STAGES
           and path.resolve() not in seen):   # a MiniMind .pth or HF folder source ends the chain
        seen.add(path.resolve())
        meta = metadata_of(path)
        chain.append((path, meta))
        source = meta.get("source", "")
        path = next((p for p in (Path(source), path.parent / Path(source).name) if source and p.is_file()), None)
    return chain


def run_metrics(path: Path) -> dict:
    """The training run's end metrics (out/logs/<name>.metrics.json beside the checkpoint), if kept."""
    found = path.parent / "logs" / f"{path.stem}.metrics.json"
    return json.loads(found.read_text()) if found.is_file() else {}


def eval_metrics(path: Path, metrics_file, out_dir) -> dict:
    if metrics_file:
        if not Path(metrics_file).is_file():
            raise ExportError(f"{metrics_file}: no such metrics file")
        return json.loads(Path(metrics_file).read_text())
    demo = Path(out_dir) / "metrics.json"   # the demo's report metrics, when they are about this checkpoint
    if demo.is_file():
        metrics = json.loads(demo.read_text())
        if metrics.get("checkpoint") == path.stem:
            return metrics
    return {}


def model_card(path: Path, meta: dict, metrics: dict, lm_cfg) -> str:
    from report import table, vision_info
    vision = json.loads(meta["vision_config"]) if "vision_config" in meta else {}
    encoder = vision_info(vision) if vision else {}
    rows = []
    for ckpt, m in reversed(stage_chain(path)):
        result = run_metrics(ckpt)
        val = result.get("val_loss")
        rows.append([f"`{ckpt.stem}`", m.get("stage", "–"), m.get("step", "–"), f"`{m.get('data') or '–'}`",
                     m.get("parts", "–"), f"{val:.4f}" if isinstance(val, float) else "–"])
    lines = ["---", "license: mit", "library_name: transformers", "pipeline_tag: text-generation",
             f"tags: [video-llm, {'qwen3' if lm_cfg.qk_norm else 'llama'}, tiny-video-llm]", "---", "",
             f"# {path.stem}", "",
             "A tiny video language model from the *tiny video LLM* repo: a Llama-style decoder, a frozen open_clip "
             "image tower, and a VideoSummary block that turns per-frame CLIP features into a few tokens the "
             "decoder reads.", "", "## Files", "",
             "- `config.json`, `model.safetensors`, tokenizer files: the **language model alone** as "
             f"`{hf_architecture(lm_cfg)}` (text in, text out; `AutoModelForCausalLM.from_pretrained`).",
             f"- `{VIDEO_MODEL_FILE}`: the **whole video model** (LM, VideoSummary, projector; config in its "
             "safetensors metadata), for `AutoModel` below and the repo's `eval.py --weight` and `scripts/web_demo.py`."]
    if vision:
        lines += [tower_line(vision)]
        if encoder.get("random"):
            lines += ["", "> **The vision tower this model was trained with is RANDOMLY INITIALISED** (seeded, never "
                      "trained): its numbers show the pipeline working, not real video understanding."]
    lines += ["", "## Model", "", table(["setting", "value"], [[f"`{k}`", v] for k, v in config_to_dict(lm_cfg).items()] +
                                        [[f"vision `{k}`", v] for k, v in vision.items() if k != "clip_pretrained"]),
              "", "## Training", "", "Stages, first to last (`source` in each checkpoint's metadata):", "",
              table(["checkpoint", "stage", "optimizer steps", "training data", "trained parts", "final val loss"],
                    rows), ""]
    if metrics:
        lines += ["## Evaluation", "", f"Exact-match accuracy **{metrics.get('accuracy')}** on {metrics.get('n')} "
                  "held-out questions" + (f" (temporal questions: {metrics['temporal_accuracy']})"
                                          if metrics.get("temporal_accuracy") is not None else "") + ".", ""]
        by_category = metrics.get("by_category") or {}
        if by_category:
            lines += [table(["category", "accuracy"], [[k, v] for k, v in by_category.items()]), ""]
        captions = metrics.get("caption_metrics") or {}
        if captions:
            lines += ["Captions: " + ", ".join(f"{k} {captions[k]}" for k in ("bleu4", "rouge_l", "cider")
                                                if k in captions), ""]
    else:
        lines += ["## Evaluation", "", "No evaluation metrics were given (`--metrics`).", ""]
    return "\n".join(lines + use_section())


def tower_line(vision: dict) -> str:
    source = vision.get("clip_pretrained") or ""
    size = f"open_clip `{vision.get('clip_model')}` ({vision.get('clip_image_size') or 'default'} px)"
    if source.endswith((".safetensors", ".pt", ".pth", ".bin")):
        return (f"- `vision_tower.safetensors`: the frozen vision tower, {size}, copied from `{Path(source).name}`; "
                "the `.py` files are the repository's own code, run by `AutoModel` with `trust_remote_code=True`.")
    return (f"- The frozen vision tower, {size} with open_clip's pretrained weights `{source}`, is not included: "
            "open_clip downloads it when the video model is loaded.")


def use_section() -> list:
    return ["## Use", "", "```python", "from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer",
            "# the whole video model (needs open_clip_torch and decord; runs the folder's .py files)",
            "model = AutoModel.from_pretrained(REPO, trust_remote_code=True)",
            'print(model.chat("Describe the video.", video="clip.mp4"))   # greedy, as eval.py --temperature 0',
            "# the language model alone, text only", "tok = AutoTokenizer.from_pretrained(REPO)",
            "lm = AutoModelForCausalLM.from_pretrained(REPO)", "```", "",
            f"In the repository: `python eval.py --weight {VIDEO_MODEL_FILE} --video clip.mp4`.", ""]


# ---------------------------------------------------------------- export and upload

def export(weight, out, out_dir="out", tokenizer=None, metrics_file=None, clip_pretrained=None) -> Path:
    """Write the folder; returns its path (a later --push_to_hub uploads exactly this folder)."""
    path = find_checkpoint(weight, out_dir)
    cfg, state = read_ours(path)
    meta = metadata_of(path)
    if tokenizer is None:
        tokenizer = meta.get("tokenizer")
        if not tokenizer:
            raise ConversionError(f"{path}: names no tokenizer; pass --tokenizer")
    if not Path(tokenizer).is_dir():
        raise ConversionError(f"{tokenizer}: tokenizer folder not found (pass --tokenizer)")
    folder = save_hf_folder(cfg, state, load_tokenizer(tokenizer), out)
    if "vision_config" in meta:   # a whole video model, not an LM-only file
        vision = json.loads(meta["vision_config"])
        vision["clip_pretrained"] = clip_pretrained or vision.get("clip_pretrained", "")
        meta = {**meta, "vision_config": json.dumps(vision)}   # the card names the tower the folder uses
        if write_video_model(folder, path, vision) is None:
            print(f"note: {path} names no vision weights, so AutoModel cannot load the video model; "
                  "pass --clip_pretrained to include it", file=sys.stderr)
    card = model_card(path, meta, eval_metrics(path, metrics_file, out_dir), cfg)
    (Path(folder) / "README.md").write_text(card + "\n")
    return folder


def push_to_hub(folder, repo_id: str, private=False, token=None) -> str:
    """Create the repo if needed and upload the folder in one commit; returns the repo's URL."""
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise ExportError("--push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    token = token or get_token()
    if not token:
        raise ExportError("--push_to_hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload {Path(folder).name}")
    except Exception as e:   # no network, a refused token, a bad repo id: one line instead of a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"--push_to_hub {repo_id}: upload failed ({type(e).__name__}: {first})") from None
    return str(url)


def main(argv=None):
    args = parse_args(argv)
    try:
        folder = export(args.weight, args.out, args.out_dir, args.tokenizer, args.metrics, args.clip_pretrained)
        architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
        print(f"{args.weight} → {folder} (transformers {architecture}; the video model behind AutoModel; README.md)")
        if args.push_to_hub:
            url = push_to_hub(folder, args.push_to_hub, args.private, args.token)
            print(f"uploaded {folder} → {url}")
    except (CheckpointError, ConversionError, TokenizerError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
