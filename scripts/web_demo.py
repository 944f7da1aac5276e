"""Browser chat with a trained checkpoint (gradio): upload a video or image, see the frames the model samples,
chat over several turns with streamed answers, switch between the checkpoints (and LoRA adapters) in out/.

    python scripts/web_demo.py --weight sft_video_128          # → http://127.0.0.1:7860
"""
import argparse
import dataclasses
import os
import queue
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from _repo import ROOT
from dataset.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, native_stderr_silenced
from model.checkpoint import CheckpointError, find_checkpoint, read_metadata
from model.engine import INPUT_ERRORS, Engine, EngineError, SamplingOptions
from model.lora import CONFIG_FILE
from model.vision import weights_are_random

# decord's reader swaps the process-wide stderr while it opens a file (native_stderr_silenced):
# two users opening videos at once could leave it swapped, so media is read one file at a time.
MEDIA_LOCK = threading.Lock()


WAITING = "Upload a video or an image and ask about it, or just chat (text only)."


class DemoError(Exception):
    """Something the user should read in the page (bad upload, model that cannot load); one line."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight", default=None, help="checkpoint or LoRA adapter folder to start with (path or name in "
                                                  "--out_dir; default: the first one there)")
    p.add_argument("--out_dir", default="out", help="the checkpoints and adapter folders offered in the model menu")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the demo to your network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max_upload_mb", type=float, default=50, help="largest upload accepted")
    p.add_argument("--max_video_frames", type=int, default=20000,
                   help="longest video accepted, in frames (its sampled frames are what the model sees)")
    p.add_argument("--concurrency", type=int, default=4, help="requests answered at the same time")
    p.add_argument("--keep_models", type=int, default=2, help="checkpoints held in memory at once")
    return p.parse_args(argv)


# ---------------------------------------------------------------- models

def list_models(out_dir, extra=None) -> dict:
    """{menu label: path} for every checkpoint (our metadata) and LoRA adapter folder in out_dir, plus `extra`."""
    found = {}
    folder = Path(out_dir)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            read_metadata(path)
        except CheckpointError:
            continue   # an LM-only file or someone else's safetensors
        found[path.stem] = str(path)
    for path in sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []:
        found[f"{path.name} (LoRA)"] = str(path)
    if extra and extra not in found.values():
        found[Path(extra).name.removesuffix(".safetensors")] = extra
    return found


def resolve_start(weight, out_dir) -> str | None:
    if weight is None:
        return None
    if (Path(weight) / CONFIG_FILE).is_file() or (Path(out_dir) / weight / CONFIG_FILE).is_file():
        return str(Path(weight) if Path(weight).is_dir() else Path(out_dir) / weight)
    return str(find_checkpoint(weight, out_dir))


class Models:
    """Engines by path, the most recently used `keep` of them, shared by every user (inference only reads them)."""

    def __init__(self, out_dir, device, keep=2):
        self.out_dir, self.device, self.keep = out_dir, device, keep
        self.loaded = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path) -> Engine:
        with self.lock:
            if path in self.loaded:
                self.loaded.move_to_end(path)
                return self.loaded[path]
            source = {"lora": path} if (Path(path) / CONFIG_FILE).is_file() else {"weight": path}
            try:
                engine = Engine.load(**source, out_dir=self.out_dir, device=self.device)
                engine.encoder   # the vision tower loads now, once, not inside two users' requests
            except INPUT_ERRORS as e:
                raise DemoError(f"cannot load {path}: {e}") from None
            self.loaded[path] = engine
            while len(self.loaded) > self.keep:
                self.loaded.popitem(last=False)
            return engine


def describe(engine) -> str:
    cfg = engine.model.vision_cfg
    tower = cfg.clip_pretrained
    random = Path(tower).is_file() and tower.endswith(".safetensors") and weights_are_random(tower)
    note = " — **its vision tower is RANDOMLY INITIALISED** (the offline demo's), so only synthetic clips make sense" \
        if random else ""
    return f"Model `{engine.name}`: {cfg.num_frames} frames per video, open_clip `{cfg.clip_model}`{note}."


# ---------------------------------------------------------------- media and chat

def media_kind(path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise DemoError(f"{Path(path).name}: not a video ({', '.join(sorted(VIDEO_SUFFIXES))}) "
                    f"or an image ({', '.join(sorted(IMAGE_SUFFIXES))})")


def video_frame_count(path) -> int:
    import decord
    try:
        with native_stderr_silenced():
            return len(decord.VideoReader(str(path), num_threads=1))
    except Exception as e:   # decord's own error types for files it cannot open
        raise DemoError(f"{Path(path).name}: cannot open the video ({str(e).splitlines()[0][:120]})") from None


def load_media(engine, path, max_video_frames):
    """(kind, sampled pixels, what the model sees of them); DemoError for what the page should say instead."""
    kind = media_kind(path)
    with MEDIA_LOCK:
        if kind == "video":
            total = video_frame_count(path)
            if total > max_video_frames:
                raise DemoError(f"{Path(path).name}: {total} frames, more than this demo takes "
                                f"({max_video_frames}; --max_video_frames)")
        try:
            pixels, seen = engine.read_media(path, kind)
        except INPUT_ERRORS as e:
            raise DemoError(str(e).replace(str(path), Path(path).name)) from None
    return kind, pixels, seen


def new_state(model_path) -> dict:
    return {"model": model_path, "media": None, "kind": None, "seen": None, "conversation": []}


def unanswerable(engine, conversation, media) -> str | None:
    """Why the model cannot answer this conversation, as the chat says it; None when it can."""
    try:
        context = len(engine.prompt_ids(conversation, media))
    except EngineError as e:   # e.g. a typed "<video>" with no video to fill it
        return f"(error: {e})"
    if context + 1 > engine.max_seq_len:
        return (f"(The conversation is longer than the model's context, {engine.max_seq_len} tokens: "
                "press Clear to start over.)")
    return None


def stream_reply(engine, conversation, media, options):
    """Yield the answer as it grows; generation runs in a worker thread so each delta reaches the page at once."""
    deltas = queue.Queue()
    finished = object()

    def work():
        try:
            engine.reply(conversation, media, options, stream=deltas.put)
            deltas.put(finished)
        except Exception as e:   # handed to the request's thread, which shows it
            deltas.put(e)
    threading.Thread(target=work, daemon=True).start()
    text = ""
    while (item := deltas.get()) is not finished:
        if isinstance(item, Exception):
            raise DemoError(f"generation failed: {item}")
        text += item
        yield text


def gallery_of(pixels):
    return [(f, f"frame {i + 1}/{len(pixels)}") for i, f in enumerate(pixels)]


def sampled(pixels, path):
    return f"{len(pixels)} frame{'s' * (len(pixels) > 1)} sampled from `{Path(path).name}`: what the model sees."


class Handlers:
    """What the page's events do; every user's own chat lives in their gradio State, not here."""

    def __init__(self, args, models, start):
        self.args, self.models, self.start = args, models, start

    def on_model(self, path, state):
        """Switch checkpoints: the chat restarts (earlier answers came from another model); the media stays."""
        import gradio as gr
        state = {**new_state(path), "media": state["media"]}
        try:
            engine = self.models.get(path)
        except DemoError as e:
            return state, [], None, f"**Error:** {e}", gr.update()
        if not state["media"]:
            return state, [], None, WAITING, describe(engine)
        try:   # another model may sample other frames, through another tower
            state["kind"], pixels, state["seen"] = load_media(engine, state["media"], self.args.max_video_frames)
        except DemoError as e:
            return {**state, "media": None}, [], None, f"**Error:** {e}", describe(engine)
        return state, [], gallery_of(pixels), sampled(pixels, state["media"]), describe(engine)

    def on_upload(self, file, state):
        state = new_state(state["model"])
        if file is None:
            return state, [], None, WAITING
        try:
            engine = self.models.get(state["model"])
            state["kind"], pixels, state["seen"] = load_media(engine, file, self.args.max_video_frames)
        except DemoError as e:
            return state, [], None, f"**Error:** {e}"
        state["media"] = file
        return state, [], gallery_of(pixels), sampled(pixels, file)

    def on_ask(self, message, history, state, max_new_tokens, temperature):
        message = (message or "").strip()
        if not message:
            yield history, state, ""
            return
        engine = self.models.get(state["model"])
        marker = f"<{state['kind']}>\n" if state["seen"] is not None and not state["conversation"] else ""
        conversation = state["conversation"] + [{"role": "user", "content": marker + message}]
        history = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, state, ""
        media = [state["seen"]] if state["seen"] is not None else []
        note = unanswerable(engine, conversation, media)
        if note:
            history[-1]["content"] = note
            yield history, state, ""
            return
        options = dataclasses.replace(SamplingOptions(), max_new_tokens=int(max_new_tokens),
                                      temperature=float(temperature))
        answer = ""
        try:
            for answer in stream_reply(engine, conversation, media, options):
                history[-1]["content"] = answer
                yield history, state, ""
        except DemoError as e:
            history[-1]["content"] = f"(error: {e})"
            yield history, state, ""
            return
        history[-1]["content"] = answer.strip()
        state = {**state, "conversation": conversation + [{"role": "assistant", "content": answer.strip()}]}
        yield history, state, ""

    def on_clear(self, state):
        return {**state, "conversation": []}, []

    def on_page_load(self, state):
        import gradio as gr
        found = list_models(self.args.out_dir, extra=self.start)
        return gr.update(choices=list(found.items()), value=state["model"])


def start_model(args, models) -> str:
    """The checkpoint the page opens with (--weight, else the first in --out_dir), loaded now: a model
    that cannot load fails at start-up, not in the first user's request."""
    start = resolve_start(args.weight, args.out_dir)
    if start is None:
        choices = list_models(args.out_dir)
        if not choices:
            raise DemoError(f"{args.out_dir}/ holds no checkpoints; train one or pass --weight")
        start = next(iter(choices.values()))
    models.get(start)
    return start


def layout(gr, args, start, first):
    """The page's components, by name (their elem_ids are what the browser test finds)."""
    ui = {"state": gr.State(new_state(start))}
    gr.Markdown("# tiny video LLM — chat\nUpload a video or an image, then ask about it. "
                "Answers stream as they are generated.")
    with gr.Row():
        with gr.Column(scale=2):
            ui["model_menu"] = gr.Dropdown(choices=list(list_models(args.out_dir, extra=start).items()), value=start,
                                           label="checkpoint", elem_id="model-menu")
            ui["model_info"] = gr.Markdown(describe(first), elem_id="model-info")
            ui["upload"] = gr.File(label=f"video or image (≤ {args.max_upload_mb:g} MB)", elem_id="upload",
                                   file_types=sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES))
            ui["status"] = gr.Markdown(WAITING, elem_id="status")
            ui["gallery"] = gr.Gallery(label="sampled frames", columns=4, height=300, object_fit="contain",
                                       elem_id="frames", type="numpy")
            with gr.Accordion("generation", open=False):
                ui["max_new"] = gr.Slider(8, 256, value=SamplingOptions.max_new_tokens, step=8,
                                          label="max new tokens")
                ui["temperature"] = gr.Slider(0, 1.5, value=SamplingOptions.temperature, step=0.1,
                                              label="temperature (0: greedy)")
        with gr.Column(scale=3):
            ui["chatbot"] = gr.Chatbot(label="chat", elem_id="chat", height=480, feedback_options=None)
            with gr.Row():
                ui["box"] = gr.Textbox(placeholder="Ask about the video…", show_label=False, scale=5,
                                       elem_id="question")
                ui["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            ui["clear"] = gr.Button("Clear chat", elem_id="clear")
    return ui


def wire(app, ui, handlers):
    """Connect the components' events to the handlers; api_names are what gradio_client calls."""
    state, chatbot = ui["state"], ui["chatbot"]
    ui["model_menu"].change(handlers.on_model, [ui["model_menu"], state],
                            [state, chatbot, ui["gallery"], ui["status"], ui["model_info"]], api_name="switch_model")
    ui["upload"].change(handlers.on_upload, [ui["upload"], state], [state, chatbot, ui["gallery"], ui["status"]],
                        api_name="upload")
    ask_inputs = [ui["box"], chatbot, state, ui["max_new"], ui["temperature"]]
    ask_outputs = [chatbot, state, ui["box"]]
    ui["send"].click(handlers.on_ask, ask_inputs, ask_outputs, api_name="ask")
    ui["box"].submit(handlers.on_ask, ask_inputs, ask_outputs, api_visibility="private")
    ui["clear"].click(handlers.on_clear, [state], [state, chatbot], api_name="clear")
    app.load(handlers.on_page_load, [state], [ui["model_menu"]])


def build_app(args):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # offline-first: no usage pings
    import gradio as gr
    device = args.device or ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    models = Models(args.out_dir, device, args.keep_models)
    start = start_model(args, models)
    handlers = Handlers(args, models, start)
    theme = gr.themes.Default(font=["sans-serif"], font_mono=["monospace"])   # system fonts: no font download
    with gr.Blocks(title="tiny video LLM", analytics_enabled=False) as app:
        wire(app, layout(gr, args, start, models.get(start)), handlers)
    app.queue(default_concurrency_limit=args.concurrency)
    return app, theme


def launch(args, block=True):
    """Start the server; returns (app, local URL). block=False returns at once, quietly (tests)."""
    app, theme = build_app(args)
    _, url, _ = app.launch(server_name=args.host, server_port=args.port, max_file_size=f"{args.max_upload_mb:g}mb",
                           prevent_thread_lock=not block, quiet=not block, ssr_mode=False, theme=theme,
                           footer_links=[], show_error=True)
    return app, url


def main(argv=None):
    args = parse_args(argv)
    try:
        launch(args)
    except (DemoError, *INPUT_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
