"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): /v1/models and /v1/chat/completions with video and images,
streamed (server-sent events) or not, every request decoded by one batching scheduler on one Engine.

    app = create_app(Engine.load(weight="sft_video_128"), ServerConfig(model_id="sft_video_128"))
    serve(app, host="127.0.0.1", port=8998)

Every error is OpenAI's {"error": {"message", "type", "param", "code"}} with a 4xx status (5xx only
for a bug); the server goes on serving after each.
"""
import asyncio
import hmac
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dataset.vlm_dataset import visual_inputs
from model.engine import EngineError, SamplingOptions
from serve.media_urls import MediaPolicy, MediaRefused, read_all
from serve.protocol import ApiError, ChatRequest, Reply, conversation_of, pydantic_problem
from serve.scheduler import Job, QueueFull, Scheduler

JSON_SLACK_BYTES = 1 << 20   # a request body may exceed its media's base64 by this much (text, JSON)


@dataclass
class ServerConfig:
    model_id: str                                  # the name clients ask for (and /v1/models lists)
    max_batch: int = 8                             # rows decoded together
    max_queue: int = 64                            # requests waiting beyond those; one more gets 429
    api_key: str = None                            # when set, every /v1 request needs "Authorization: Bearer <key>"
    media: MediaPolicy = field(default_factory=MediaPolicy)
    created: int = 0                               # the model's timestamp in /v1/models (its checkpoint's mtime)

    @property
    def max_body_bytes(self) -> int:
        return self.media.max_bytes * 4 // 3 + JSON_SLACK_BYTES   # base64 spends 4 bytes per 3


def create_app(engine, config: ServerConfig) -> FastAPI:
    """The app serving `engine` as config.model_id; its scheduler thread starts now and stops with the app."""
    engine.encoder   # the vision tower loads now: a bad one fails at start-up, not in the first request
    engine.chat.cache_entries = 0   # a server's prompts rarely recur: keeping their ids would only grow memory
    scheduler = Scheduler(engine, config.max_batch, config.max_queue)

    @asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()

    app = FastAPI(title="tiny video LLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.config, app.state.scheduler = engine, config, scheduler
    add_error_handlers(app)
    add_routes(app, engine, config, scheduler)
    return app


def add_error_handlers(app: FastAPI):
    """Every error in OpenAI's shape: ours, FastAPI's validation errors (as 400) and Starlette's 404/405."""
    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        problem = pydantic_problem(list(error.errors()))
        return JSONResponse(problem.body(), status_code=problem.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):   # a bug: the traceback is logged, the client gets JSON
        body = ApiError(500, f"internal error ({type(error).__name__})", kind="server_error").body()
        return JSONResponse(body, status_code=500)


def add_routes(app: FastAPI, engine, config: ServerConfig, scheduler: Scheduler):
    model_card = {"id": config.model_id, "object": "model", "created": config.created, "owned_by": "local"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request, config)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request, config)
        if model_id != config.model_id:
            raise unknown_model(model_id, config)
        return model_card

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request, config)
        return scheduler.counts()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request, config)
        try:
            ticket = scheduler.reserve()
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", code="queue_full",
                           kind="rate_limit_error") from None
        try:
            chat = await run_in_threadpool(parse_chat, await read_body(request, config.max_body_bytes))
            if chat.model != config.model_id:
                raise unknown_model(chat.model, config)
            job = await run_in_threadpool(prepare_job, engine, chat, config)
            reply = Reply(config.model_id)
            job.listener = Listener(asyncio.get_running_loop())
            scheduler.submit(job)
        except BaseException:
            ticket.release()
            raise
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return JobStream(sse_events(job, reply, include_usage), job, ticket)
        try:
            return await answer(request, job, reply)
        finally:
            ticket.release()


def check_key(request: Request, config: ServerConfig):
    if config.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send the header Authorization: Bearer <key>)",
                       code="invalid_api_key", kind="authentication_error")


def unknown_model(name: str, config: ServerConfig) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist here; this server serves {config.model_id!r}",
                    param="model", code="model_not_found")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read no further than `limit` bytes (413 beyond)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than this server takes ({limit} bytes; --max_media_bytes)",
                    code="request_too_large")


def parse_chat(body: bytes) -> ChatRequest:
    """The request's JSON as a ChatRequest; a 400 ApiError for malformed JSON or wrong types."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        chat = ChatRequest.model_validate(data)
    except ValidationError as e:   # the same 400 FastAPI's own validation errors get (add_error_handlers)
        raise pydantic_problem(e.errors()) from None
    if chat.n not in (None, 1):
        raise ApiError(400, f"n: this server makes one choice per request (n=1), not {chat.n}", param="n",
                       code="invalid_value")
    return chat


def prepare_job(engine, chat: ChatRequest, config: ServerConfig) -> Job:
    """Everything decoding needs, checked: the prompt's ids (media read and encoded), options, token budget."""
    turns, refs = conversation_of(chat.messages)
    try:
        options = SamplingOptions(max_new_tokens=0, temperature=1.0 if chat.temperature is None else chat.temperature,
                                  top_p=1.0 if chat.top_p is None else chat.top_p, seed=chat.sampling_seed(),
                                  stop=chat.stop or ())
    except EngineError as e:
        raise ApiError(400, str(e), param="stop", code="invalid_value") from None
    try:
        media = read_all(engine, refs, config.media)
    except MediaRefused as e:
        raise ApiError(e.status, str(e), param=e.where, code=e.code) from None
    try:
        ids = engine.prompt_ids(turns, media)
    except EngineError as e:
        raise ApiError(400, str(e), param="messages", code="invalid_value") from None
    room = engine.max_seq_len - len(ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(ids)} tokens (media included); this model's context is "
                            f"{engine.max_seq_len} and its answer needs at least one more",
                       param="messages", code="context_length_exceeded")
    limit = chat.token_limit()
    budget = room if limit is None else min(limit, room)
    return Job(ids, visual_inputs(media, None, engine.device), options, budget, listener=None,
               stream=bool(chat.stream))


class Listener:
    """Hands a job's events from the scheduler's thread to the request's event loop."""

    def __init__(self, loop):
        self.loop, self.events = loop, asyncio.Queue()

    def _put(self, event, value):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (event, value))

    def text(self, delta):
        self._put("text", delta)

    def done(self, result):
        self._put("done", result)

    def error(self, error):
        self._put("error", error)


async def answer(request: Request, job: Job, reply: Reply):
    """The whole completion as one JSON object; a client that leaves first cancels its job."""
    gone = asyncio.ensure_future(wait_for_disconnect(request))
    finished = asyncio.ensure_future(last_event(job.listener))
    try:
        await asyncio.wait({gone, finished}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not finished.done():
        job.cancelled.set()
        finished.cancel()
        return Response(status_code=499)   # nobody reads it: the client has gone
    event, value = finished.result()
    if event == "error":
        raise ApiError(500, f"generation failed ({type(value).__name__})", kind="server_error")
    return JSONResponse(reply.completion(value))


async def last_event(listener: Listener):
    while True:
        event, value = await listener.events.get()
        if event != "text":
            return event, value


async def wait_for_disconnect(request: Request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(data) -> str:
    return f"data: {json.dumps(data) if not isinstance(data, str) else data}\n\n"


async def sse_events(job: Job, reply: Reply, include_usage: bool):
    """The completion as server-sent chat.completion.chunk events, ending with data: [DONE]."""
    yield sse(reply.chunk({"role": "assistant", "content": ""}, with_usage=include_usage))
    while True:
        event, value = await job.listener.events.get()
        if event == "text":
            yield sse(reply.chunk({"content": value}, with_usage=include_usage))
            continue
        if event == "done":
            yield sse(reply.chunk({}, value.finish_reason, with_usage=include_usage))
            if include_usage:
                yield sse(reply.usage_chunk(value))
        else:   # headers are sent: the error travels as an event, as OpenAI's streams carry theirs
            yield sse(ApiError(500, f"generation failed ({type(value).__name__})", kind="server_error").body())
        yield sse("[DONE]")
        return


class JobStream(StreamingResponse):
    """A streamed completion that cancels its job and frees its place however the response ends
    (finished, or the client gone: Starlette then cancels the stream)."""

    def __init__(self, events, job: Job, ticket):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job, self.ticket = job, ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()   # a no-op once the job is done
            self.ticket.release()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8998, log_level: str = "info"):
    """Run the app with uvicorn until interrupted."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

