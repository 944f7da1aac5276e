"""The video model as an lmms-eval model (`--model tiny_video_llm`), on the inference Engine.

Two classes under one name, as lmms-eval resolves it: TinyVideoChat (the "chat" type, the default)
reads each request's messages; TinyVideoSimple (`--force_simple`) reads the context string and the
task's visuals, and is the one that scores options by likelihood (lmms-eval builds likelihood
requests only for simple-type tasks). Both answer in left-padded batches of --batch_size, greedy
unless the task asks to sample, with eval.py's prompt (one <video>/<image> marker per visual, then
the text) and the checkpoint's own frame sampling (Engine.read_media).

Visuals: file paths (video or image, by extension), PIL images, and decoded frames of one video (a
list of PIL images or a (T, H, W, 3) uint8 array, sampled uniformly to the checkpoint's frame count;
their times are unknown, so a model that reads seconds refuses them). Video segments (start/end
times) and audio are not supported.
"""
from pathlib import Path

import numpy as np
import torch

from dataset.media import IMAGE_SUFFIXES, MAX_SIDE, uniform_indices
from dataset.vlm_dataset import MediaEntry, collate, visual_inputs
from model.choices import answer_loglikelihoods
from model.engine import MEDIA_KINDS, Engine, EngineError, SamplingOptions

try:
    from lmms_eval.api.model import lmms
except ImportError as e:   # scripts/run_lmms_eval.py says so in one line before it imports this module
    raise ImportError("benchmarks/lmms_model.py needs lmms-eval (pip install lmms-eval)") from e

try:
    from lmms_eval.api.instance import GenerationResult
except ImportError:   # versions before it keep responses as the model returns them
    GenerationResult = None

MODEL_NAME = "tiny_video_llm"
STILL_SUFFIXES = IMAGE_SUFFIXES | {".gif", ".tif", ".tiff"}   # the image loader's, and what PIL also reads


def register():
    """Make `--model tiny_video_llm` name these classes in lmms-eval's model registry."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(
        model_id=MODEL_NAME, chat_class_path=f"{__name__}.TinyVideoChat",
        simple_class_path=f"{__name__}.TinyVideoSimple"), overwrite=True)


def sampling_options(gen_kwargs: dict) -> SamplingOptions:
    """An lmms-eval task's generation_kwargs as our options: greedy unless do_sample (or a temperature
    above 0 without do_sample: false); `until` strings stop the answer; 64 new tokens by default."""
    sample = gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature") or 0) > 0)
    until = gen_kwargs.get("until") or ()
    until = [until] if isinstance(until, str) else until
    return SamplingOptions(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or 64),
                           temperature=float(gen_kwargs.get("temperature") or 1.0) if sample else 0.0,
                           top_p=float(gen_kwargs.get("top_p") or 1.0) if sample else 0.9,
                           stop=tuple(s for s in until if s))


def visual_kind(visual) -> str:
    """"video" or "image" for one visual as lmms-eval hands it."""
    if isinstance(visual, (str, Path)):
        return "image" if Path(visual).suffix.lower() in STILL_SUFFIXES else "video"
    if hasattr(visual, "convert") or isinstance(visual, np.ndarray) and visual.ndim == 3:
        return "image"   # a PIL image, or one (H, W, 3) frame
    if isinstance(visual, (list, tuple, np.ndarray)):
        return "video"   # its decoded frames
    if isinstance(visual, dict):
        raise EngineError("video segments (a dict with start/end times) are not supported; give the path")
    raise EngineError(f"unsupported visual {type(visual).__name__} (paths, PIL images and frames are)")


def frames_array(visual) -> np.ndarray:
    """uint8 (T, H, W, 3) of a PIL image, one frame, or a video's decoded frames."""
    frames = [visual] if hasattr(visual, "convert") or isinstance(visual, np.ndarray) and visual.ndim == 3 \
        else list(visual)
    arrays = []
    for frame in frames:
        if hasattr(frame, "convert"):
            frame = frame.convert("RGB")
            frame.thumbnail((MAX_SIDE, MAX_SIDE))   # as dataset/media.py reads an image file
        arrays.append(np.asarray(frame, dtype=np.uint8))
    if not arrays or any(a.ndim != 3 or a.shape[-1] != 3 for a in arrays):
        raise EngineError("decoded frames must be RGB images (H, W, 3)")
    return np.stack(arrays)


class EngineModel(lmms):
    """What both model types share: the Engine, media reading, batched answers and likelihoods."""

    def __init__(self, weight=None, lora=None, out_dir="out", tokenizer=None, clip_pretrained=None,
                 device=None, batch_size=32, max_batch_size=None, **unused):
        super().__init__()
        if unused:
            raise EngineError(f"unknown model_args: {', '.join(sorted(unused))} (weight, lora, out_dir, "
                              f"tokenizer, clip_pretrained)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = Engine.load(weight=weight, lora=lora, out_dir=out_dir, device=device, tokenizer=tokenizer,
                                  clip_pretrained=clip_pretrained)
        if not str(batch_size or 1).isdigit():
            raise EngineError(f"--batch_size {batch_size}: give a number (no 'auto' for this model)")
        self.batch_size = max(1, int(batch_size or 1))

    def seen(self, visual) -> MediaEntry:
        """What the model sees of one visual: read as eval.py reads a file, or from decoded frames."""
        kind = visual_kind(visual)
        if isinstance(visual, (str, Path)):
            return self.engine.read_media(str(visual), kind)[1]
        cfg = self.engine.model.vision_cfg
        pixels = frames_array(visual)
        if kind == "video":
            pixels = pixels[uniform_indices(len(pixels), cfg.num_frames)]
        times = torch.zeros(1) if kind == "image" else None   # a decoded video's frame times are unknown
        return MediaEntry("features", self.engine.encoder.encode(pixels), times)

    def prompt(self, conversation, visuals) -> tuple:
        """(prompt ids, media entries) of a conversation whose markers match `visuals` in order."""
        media = [self.seen(v) for v in visuals]
        return self.engine.prompt_ids(conversation, media), media

    def answer(self, prompts, gen_kwargs) -> list:
        """Answers to (conversation, visuals) prompts sharing generation kwargs, batch by batch."""
        options, answers = sampling_options(gen_kwargs), []
        for start in range(0, len(prompts), self.batch_size):
            items = []
            for conversation, visuals in prompts[start:start + self.batch_size]:
                ids, media = self.prompt(conversation, visuals)
                items.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(ids), "media": media})
            batch = collate(items, self.engine.chat.pad_id, left_pad=True)
            visual = visual_inputs(batch["media"], None, self.engine.device)
            answers += self.engine.generate_batch(batch, visual, options)
        return answers

    def answer_requests(self, requests, kwargs_at: int, prompt_of) -> list:
        """generate_until's answers in request order, batched among the requests that share generation
        kwargs (args[kwargs_at]); prompt_of(args) → (conversation, visuals)."""
        answers = [None] * len(requests)
        for indices in grouped(requests, lambda r: r.args[kwargs_at]).values():
            prompts = [prompt_of(requests[i].args) for i in indices]
            for i, answer in zip(indices, self.answer(prompts, requests[indices[0]].args[kwargs_at])):
                answers[i] = answer
        return answers

    @torch.inference_mode()
    def likelihoods(self, rows) -> list:
        """(sum of log-probs, greedy?) of each (conversation, visuals, answer) row's answer as the
        assistant turn: the answer's tokens and the turn's end token, given the prompt."""
        results = []
        for start in range(0, len(rows), self.batch_size):
            chunk = [(*self.prompt(c, v), self.engine.chat.text(a) + [self.engine.chat.im_end])
                     for c, v, a in rows[start:start + self.batch_size]]
            results += self._score_chunk(chunk)
        return results

    def _score_chunk(self, chunk) -> list:
        engine = self.engine
        width = max(len(p) + len(a) for p, _, a in chunk)
        if width > engine.max_seq_len:
            raise EngineError(f"a prompt with its answer is {width} tokens, longer than the model's context "
                              f"({engine.max_seq_len})")
        visual = visual_inputs([m for _, media, _ in chunk for m in media], None, engine.device)
        return answer_loglikelihoods(engine.model, [(p, a) for p, _, a in chunk], visual, engine.chat.pad_id)

    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation is not supported")


def user_turn(text: str, visuals) -> dict:
    """A simple-mode context as our user turn: one marker per visual before the text, unless the text
    already has exactly as many markers."""
    kinds = [visual_kind(v) for v in visuals]
    if sum(text.count(f"<{k}>") for k in MEDIA_KINDS) == len(kinds) and kinds:
        return {"role": "user", "content": text}
    return {"role": "user", "content": "".join(f"<{k}>\n" for k in kinds) + text}


def chat_turns(messages) -> tuple:
    """lmms-eval chat messages → (our conversation, its visuals in marker order). A media part becomes
    "<kind>\\n" in its place; a system message is kept as ours."""
    conversation, visuals = [], []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        text = ""
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                text += part["text"]
            elif kind in MEDIA_KINDS:
                url = part.get("url")
                if kind == "video" and isinstance(url, dict) or part.get("start_time") is not None:
                    raise EngineError("video segments (start/end times) are not supported; give the whole video")
                visuals.append(url)
                text += f"<{kind}>\n"
            else:
                raise EngineError(f"unsupported message part {kind!r} (text, image and video are)")
        conversation.append({"role": message["role"], "content": text})
    return conversation, visuals


def as_response(pair):
    """A (log-prob, greedy) pair as lmms-eval 0.7.3 keeps it: its evaluator passes every response through
    unwrap_generation_output, which turns a bare tuple into its str; a GenerationResult's text passes as is."""
    return GenerationResult(text=pair) if GenerationResult else pair


def grouped(requests, key) -> dict:
    """{generation kwargs as text: [request index, ...]} in request order."""
    groups = {}
    for i, request in enumerate(requests):
        groups.setdefault(repr(sorted(key(request).items())), []).append(i)
    return groups


class TinyVideoSimple(EngineModel):
    """lmms-eval's simple type: (context, kwargs, doc_to_visual, doc_id, task, split) requests."""
    is_simple = True

    def visuals(self, doc_to_visual, doc_id, task, split) -> list:
        found = doc_to_visual(self.task_dict[task][split][doc_id]) if callable(doc_to_visual) else doc_to_visual
        return [v for v in (found or []) if v is not None]

    def generate_until(self, requests) -> list:
        return self.answer_requests(requests, 1, self.prompt_of)

    def prompt_of(self, args) -> tuple:
        context, _, doc_to_visual, doc_id, task, split = args
        visuals = self.visuals(doc_to_visual, doc_id, task, split)
        return [user_turn(context, visuals)], visuals

    def loglikelihood(self, requests) -> list:
        """(negative log-likelihood of the continuation, greedy?) per request: lower is likelier."""
        rows = []
        for request in requests:
            context, continuation, *where = request.args   # acc_mutual_info's unconditional requests: no `where`
            if callable(continuation):   # a loglikelihood task hands its doc_to_target
                _, doc_id, task, split = where
                continuation = continuation(self.task_dict[task][split][doc_id])
            conversation, visuals = self.prompt_of((context, None, *where)) if where else ([user_turn(context, [])], [])
            # The answer is the assistant turn's text: the delimiter lmms-eval puts before it means nothing there.
            rows.append((conversation, visuals, str(continuation).lstrip()))
        # lmms-eval's models return a loss here and its multiple-choice scoring picks the option with the
        # smallest value (argmin), so each answer's value is its negative log-likelihood, summed over tokens.
        return [as_response((-logprob, greedy)) for logprob, greedy in self.likelihoods(rows)]


class TinyVideoChat(EngineModel):
    """lmms-eval's chat type: (context, doc_to_messages, kwargs, doc_id, task, split) requests."""
    is_simple = False

    def generate_until(self, requests) -> list:
        return self.answer_requests(requests, 2, self.prompt_of)

    def prompt_of(self, args) -> tuple:
        _, doc_to_messages, _, doc_id, task, split = args
        return chat_turns(doc_to_messages(self.task_dict[task][split][doc_id]))

    def loglikelihood(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: likelihood tasks run with --force_simple "
                                  f"(lmms-eval's chat tasks only generate)")
