"""Media URLs of API requests → what the model sees: data: URLs, local paths under a root, and (when allowed) http(s).

Every item is read with the engine's read_media, one at a time (decord swaps the process-wide stderr
while it opens a file, see scripts/web_demo.py), after checks that keep memory bounded: the request's
decoded media bytes, a video's frame count and an image's pixel count.
"""
import base64
import binascii
import os
import re
import tempfile
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dataset.media import MediaError, decoder_message, native_stderr_silenced
from model.engine import INPUT_ERRORS

MEDIA_LOCK = threading.Lock()
MAX_IMAGE_PIXELS = 50_000_000   # larger images are refused before PIL decodes them
REMOTE_TIMEOUT_S = 20
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
SUFFIXES = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
            "video/x-msvideo": ".avi", "image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp",
            "image/bmp": ".bmp"}


class MediaRefused(Exception):
    """A media item the server will not or cannot use: an HTTP status (400 or 413), a one-line message
    (starting with where the item sits) and the OpenAI error code."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code
        self.where = message.split(":", 1)[0]


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how much of it a request may carry."""
    root: Path = None              # local paths are allowed only under this folder (None: no local paths)
    allow_remote: bool = False     # fetch http(s) URLs (a server that fetches any URL it is sent is an SSRF hole)
    max_bytes: int = 32 << 20      # all media of one request together, decoded
    max_video_frames: int = 20000


@dataclass
class MediaRef:
    """One media part of a request, in marker order: its kind, URL and where it sits (for messages)."""
    kind: str                      # "video" or "image"
    url: str
    where: str                     # e.g. "messages[0].content[1]"


def read_all(engine, refs: list, policy: MediaPolicy) -> list:
    """What the model sees of every item (read_media's MediaEntry), in order; MediaRefused for the first bad one."""
    budget = [policy.max_bytes]   # bytes the request may still bring
    seen = []
    for ref in refs:
        with local_file(ref, policy, budget) as path:
            with MEDIA_LOCK:
                check_size(path, ref, policy)
                try:
                    seen.append(engine.read_media(str(path), ref.kind)[1])
                except INPUT_ERRORS as e:
                    raise MediaRefused(400, f"{ref.where}: {str(e).replace(str(path), ref.kind)}", "invalid_media") \
                        from None
    return seen


@contextmanager
def local_file(ref: MediaRef, policy: MediaPolicy, budget: list):
    """A file holding the item: a temporary one for data: and http(s) URLs (removed afterwards), the
    file itself for a path under the media root."""
    found = SCHEME.match(ref.url[:32])
    scheme = found.group(1).lower() if found else ""
    if scheme in ("", "file"):
        path = allowed_path(ref, policy)
        spend(budget, path.stat().st_size, ref)
        yield path
        return
    if scheme == "data":
        mime, payload = decode_data_url(ref, budget)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise MediaRefused(400, f"{ref.where}: remote media URLs are refused (the server allows them "
                                    "with --allow_remote_media); send the file as a data: URL", "remote_media_refused")
        mime, payload = fetch(ref, budget)
    else:
        raise MediaRefused(400, f"{ref.where}: unsupported URL scheme {scheme!r} (data:, a path, or http(s))",
                           "invalid_media_url")
    handle, name = tempfile.mkstemp(prefix="serve-media-", suffix=SUFFIXES.get(mime, ".bin"))
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
        del payload
        yield Path(name)
    finally:
        os.unlink(name)


def spend(budget: list, size: int, ref: MediaRef):
    budget[0] -= size
    if budget[0] < 0:
        raise MediaRefused(413, f"{ref.where}: the request's media are larger than this server takes "
                                f"(--max_media_bytes)", "media_too_large")


def allowed_path(ref: MediaRef, policy: MediaPolicy) -> Path:
    """The local file a path or file: URL names, if it lies under the media root (symlinks resolved)."""
    if policy.root is None:
        raise MediaRefused(400, f"{ref.where}: local media paths are refused (the server takes them under "
                                "--media_root); send the file as a data: URL", "local_media_refused")
    raw = urllib.parse.unquote(urllib.parse.urlsplit(ref.url).path) if ref.url.startswith("file:") else ref.url
    root = policy.root.resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise MediaRefused(400, f"{ref.where}: the path is outside the server's media root", "invalid_media_url")
    if not path.is_file():
        raise MediaRefused(400, f"{ref.where}: no such file under the media root", "invalid_media_url")
    return path


def decode_data_url(ref: MediaRef, budget: list):
    """(media type, bytes) of a data: URL, base64 or percent-encoded; its size is checked before decoding."""
    head, comma, data = ref.url[5:].partition(",")
    if not comma:
        raise MediaRefused(400, f"{ref.where}: a data: URL needs a comma before its data", "invalid_media_url")
    params = head.split(";")
    is_base64 = params[-1].strip().lower() == "base64"
    spend(budget, len(data) * 3 // 4 if is_base64 else len(data), ref)
    try:
        payload = base64.b64decode(data, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(data)
    except (binascii.Error, ValueError):
        raise MediaRefused(400, f"{ref.where}: the data: URL is not valid base64", "invalid_media_url") from None
    if not payload:
        raise MediaRefused(400, f"{ref.where}: the data: URL holds no data", "invalid_media")
    return params[0].strip().lower(), payload


def fetch(ref: MediaRef, budget: list):
    """(media type, bytes) of an http(s) URL, read no further than the request's byte budget."""
    import httpx
    chunks = []
    try:
        with httpx.stream("GET", ref.url, timeout=REMOTE_TIMEOUT_S, follow_redirects=True) as response:
            if response.status_code != 200:
                raise MediaRefused(400, f"{ref.where}: fetching it gave HTTP {response.status_code}", "invalid_media_url")
            for chunk in response.iter_bytes():
                spend(budget, len(chunk), ref)
                chunks.append(chunk)
            mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
    except httpx.HTTPError as e:
        raise MediaRefused(400, f"{ref.where}: cannot fetch it ({type(e).__name__})", "invalid_media_url") from None
    return mime, b"".join(chunks)


def check_size(path: Path, ref: MediaRef, policy: MediaPolicy):
    """413 for a video of more frames, or an image of more pixels, than the server decodes; 400 if the
    header cannot be read (read_media would say the same, later and slower)."""
    try:
        if ref.kind == "video":
            import decord
            with native_stderr_silenced():
                frames = len(decord.VideoReader(str(path), num_threads=1))
            if frames > policy.max_video_frames:
                raise MediaRefused(413, f"{ref.where}: {frames} frames, more than this server takes "
                                        f"({policy.max_video_frames}; --max_video_frames)", "too_many_frames")
        else:
            from PIL import Image
            with Image.open(path) as image:
                pixels = image.size[0] * image.size[1]
            if pixels > MAX_IMAGE_PIXELS:
                raise MediaRefused(413, f"{ref.where}: {pixels} pixels, more than this server takes "
                                        f"({MAX_IMAGE_PIXELS})", "too_many_pixels")
    except (MediaRefused, MediaError):
        raise
    except Exception as e:   # decord's and PIL's own error types for files they cannot open
        message = decoder_message(e).replace(str(path), ref.kind)
        raise MediaRefused(400, f"{ref.where}: cannot open the {ref.kind} ({message})", "invalid_media") from None
