"""The OpenAI chat-completions wire format: request models, the error shape, and the response and chunk objects.

Messages become the repository's chat format (model/chat.py): each image_url / video_url part turns
into an <image> / <video> marker where it stands in its turn, parts joined by newlines, so
[video, text] is "<video>\\n<text>", the jsonl schema's and eval.py's spelling.
"""
import secrets
import time
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from model.chat import MEDIA_MARKER
from serve.media_urls import MediaRef

MAX_SEED = 2 ** 63 - 1


class ApiError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- requests

class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")   # clients send fields this server does not use (user, logprobs, ...)


class MediaURL(Lenient):
    url: StrictStr


class TextPart(Lenient):
    type: Literal["text"]
    text: StrictStr


class ImagePart(Lenient):
    type: Literal["image_url"]
    image_url: Union[MediaURL, StrictStr]   # the object OpenAI sends, or a bare URL as some clients do


class VideoPart(Lenient):
    type: Literal["video_url"]
    video_url: Union[MediaURL, StrictStr]


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[Part], None] = None


class StreamOptions(Lenient):
    include_usage: StrictBool = False


class ChatRequest(Lenient):
    """The fields this server reads; null stands for "not given", as in OpenAI's API."""
    model: StrictStr
    messages: list[Message] = Field(min_length=1)
    stream: Union[StrictBool, None] = False
    stream_options: Union[StreamOptions, None] = None
    temperature: Union[Annotated[float, Field(strict=True, ge=0, le=2)], None] = None   # None: 1, OpenAI's default
    top_p: Union[Annotated[float, Field(strict=True, gt=0, le=1)], None] = None         # None: 1
    max_tokens: Union[Annotated[int, Field(strict=True, ge=0)], None] = None           # None: the rest of the context
    max_completion_tokens: Union[Annotated[int, Field(strict=True, ge=0)], None] = None   # max_tokens' newer name
    seed: Union[Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)], None] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: Union[StrictInt, None] = None

    def token_limit(self):
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_seed(self) -> int:
        """The seed asked for, or a fresh one: without a seed, two identical requests may differ (as in OpenAI's API)."""
        return self.seed if self.seed is not None else secrets.randbits(63)


FIELD_NAMES = {name for model in (ChatRequest, Message, StreamOptions, TextPart, ImagePart, VideoPart, MediaURL)
               for name in model.model_fields}


def conversation_of(messages: list) -> tuple:
    """(turns in the chat format, the media parts in marker order); ApiError for what it cannot express."""
    turns, media = [], []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        parts = message.content if isinstance(message.content, list) else [TextPart(type="text", text=message.content or "")]
        pieces = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content" + (f"[{j}]" if isinstance(message.content, list) else "")
            if isinstance(part, TextPart):
                if MEDIA_MARKER.search(part.text):
                    raise ApiError(400, f"{where}: text may not contain <video> or <image>; send media as "
                                        "image_url / video_url parts", param=where, code="invalid_value")
                pieces.append(part.text)
                continue
            if role != "user":
                raise ApiError(400, f"{where}: media may only sit in user messages", param=where, code="invalid_value")
            kind = "image" if isinstance(part, ImagePart) else "video"
            url = part.image_url if kind == "image" else part.video_url
            media.append(MediaRef(kind, url if isinstance(url, str) else url.url, where))
            pieces.append(f"<{kind}>")
        turns.append({"role": role, "content": "\n".join(pieces)})
    return turns, media


def field_path(loc) -> list:
    """A validation error's location as the client wrote it: field names and list indices, without
    "body" and the names pydantic gives a union's branches ("str", "list[...]", "MediaURL")."""
    path = []
    for part in loc:
        if isinstance(part, int) or part in FIELD_NAMES and (not path or path[-1] != part):   # a tag repeats its field
            path.append(part)
    return path


def pydantic_problem(errors: list) -> ApiError:
    """One 400 ApiError for pydantic's (or FastAPI's) validation errors: the deepest one (a union's branch
    that got furthest), at the field path the client wrote."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, "malformed JSON in the request body", code="invalid_json")
    first = max(errors, key=lambda e: len(field_path(e.get("loc", ()))))
    loc = field_path(first.get("loc", ()))
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = f"{param}: {first.get('msg')}" if param else first.get("msg", "invalid request")
    return ApiError(400, message, param=param, code=first.get("type"))


# ---------------------------------------------------------------- responses

class Reply:
    """The fields every object of one completion shares."""

    def __init__(self, model: str):
        self.id, self.created, self.model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), model

    def completion(self, result) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason, "logprobs": None}],
                "usage": usage(result), "system_fingerprint": None}

    def chunk(self, delta: dict, finish_reason=None, with_usage=False) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                 "system_fingerprint": None}
        if with_usage:
            chunk["usage"] = None   # every chunk has the key; the last one (usage_chunk) carries the counts
        return chunk

    def usage_chunk(self, result) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(result), "system_fingerprint": None}


def usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
