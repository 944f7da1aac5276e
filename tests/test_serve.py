"""scripts/serve_openai_api.py on loopback with a tiny trained checkpoint: the real `openai` client asks about text,
an image and a video (data URLs, paths under --media_root, http when allowed), streamed and not, over several
turns, and gets the engine's own greedy answers (eval.py --prompt's); the bad-input table over raw HTTP (a 4xx
OpenAI error each, the server answering afterwards); 6 concurrent streaming clients batched token by token; a
client that leaves stops its generation; 429 when the queue is full; 401 without the --api_key, through the
command line."""
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT

openai = pytest.importorskip("openai", reason="the server tests use the openai client (pip install openai)")

from model.engine import Engine, SamplingOptions  # noqa: E402
from serve.media_urls import MediaPolicy  # noqa: E402
from serve.openai_api import ServerConfig, create_app  # noqa: E402

MODEL = "sft_video_32"
GREEDY = dict(temperature=0, max_tokens=64)
QUESTIONS = ("Describe the video.", "What happens in the video?", "Give a short caption.", "How many shapes are in the video?")
SLOW_STEP_S = 0.03   # the slow servers' model sleeps this long per forward: answers outlast a client's moves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """An app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn
        self.app, port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        self.stats = app.state.scheduler.counts

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kwargs)

    def close(self):
        self.server.should_exit = True
        self.thread.join(15)


def serve_engine(engine, **config) -> Running:
    return Running(create_app(engine, ServerConfig(model_id=MODEL, **config)))


@pytest.fixture(scope="module")
def reference(caption_checkpoint):
    """The one-at-a-time engine the answers are compared with (eval.py's path, its own model copy)."""
    return Engine.load(weight=str(caption_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def server(caption_checkpoint, synthetic):
    running = serve_engine(Engine.load(weight=str(caption_checkpoint), device="cpu"),
                           media=MediaPolicy(root=synthetic, max_bytes=2 << 20))
    yield running
    running.close()


@pytest.fixture(scope="module")
def slow_engine(caption_checkpoint):
    engine = Engine.load(weight=str(caption_checkpoint), device="cpu")
    engine.model.lm.register_forward_pre_hook(lambda module, args: time.sleep(SLOW_STEP_S))
    return engine


@pytest.fixture(scope="module")
def slow_server(slow_engine):
    running = serve_engine(slow_engine, max_batch=8, max_queue=8)
    yield running
    running.close()


def data_url(path, mime) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def video_part(path):
    return {"type": "video_url", "video_url": {"url": data_url(path, "video/mp4")}}


def ask_about(part, question) -> list:
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def engine_answer(engine, kind, path, question, **options) -> str:
    _, seen = engine.read_media(str(path), kind)
    options = SamplingOptions(**{"max_new_tokens": 64, **options})
    return engine.reply([{"role": "user", "content": f"<{kind}>\n{question}"}], [seen], options)


@pytest.fixture(scope="module")
def cases(reference, synthetic) -> list:
    """(video, question, the engine's greedy answer), those of several words first: a one-word answer
    can arrive as one token, leaving nothing to see streamed."""
    found = [(video, q, engine_answer(reference, "video", video, q))
             for video in sorted((synthetic / "videos").glob("t*.mp4")) for q in QUESTIONS]
    found.sort(key=lambda case: -len(case[2].split()))
    assert len(found[0][2].split()) >= 3, found[:3]
    return found


# ---------------------------------------------------------------- the openai client


def test_models_lists_the_served_checkpoint(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_text_image_and_video_get_the_engine_s_greedy_answers(server, reference, synthetic, cases):
    client = server.client()
    video, question, expected = cases[0]
    reply = client.chat.completions.create(model=MODEL, messages=ask_about(video_part(video), question), **GREEDY)
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    assert reply.object == "chat.completion" and reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens == len(reference.prompt_ids(
        [{"role": "user", "content": f"<video>\n{question}"}], [reference.read_media(str(video), "video")[1]]))
    image = synthetic / "images" / "i00000.png"
    image_part = {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}}
    reply = client.chat.completions.create(model=MODEL, messages=ask_about(image_part, "What colour is the shape?"), **GREEDY)
    assert reply.choices[0].message.content == engine_answer(reference, "image", image, "What colour is the shape?")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], **GREEDY)
    assert reply.choices[0].message.content == reference.reply([{"role": "user", "content": "Hello"}], [],
                                                               SamplingOptions(max_new_tokens=64))


def test_a_greedy_answer_is_eval_py_s_answer(server, caption_checkpoint, cases, capsys):
    import eval as evaluation
    video, question, _ = cases[0]
    evaluation.main(["--weight", str(caption_checkpoint), "--video", str(video), "--prompt", question, "--device", "cpu"])
    printed = capsys.readouterr().out.strip()
    reply = server.client().chat.completions.create(model=MODEL, messages=ask_about(video_part(video), question), **GREEDY)
    assert printed and reply.choices[0].message.content == printed


def test_a_stream_joins_to_the_answer_and_ends_with_done(server, cases):
    video, question, expected = cases[0]
    stream = server.client().chat.completions.create(model=MODEL, messages=ask_about(video_part(video), question),
                                                     stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(pieces)
    body = {"model": MODEL, "messages": ask_about(video_part(video), question), "stream": True, **GREEDY}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_several_turns_with_the_video_in_the_first(server, reference, cases):
    video, question, first = cases[0]
    messages = ask_about(video_part(video), question) + [
        {"role": "assistant", "content": first}, {"role": "user", "content": "What colour is the square?"}]
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    _, seen = reference.read_media(str(video), "video")
    expected = reference.reply([{"role": "user", "content": f"<video>\n{question}"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "What colour is the square?"}], [seen],
                               SamplingOptions(max_new_tokens=64))
    assert reply.choices[0].message.content == expected


def test_paths_under_the_media_root_are_read_and_escapes_refused(server, synthetic, cases):
    video, question, expected = cases[0]
    client = server.client()
    for url in (f"videos/{video.name}", f"file://{video}"):
        reply = client.chat.completions.create(
            model=MODEL, messages=ask_about({"type": "video_url", "video_url": {"url": url}}, question), **GREEDY)
        assert reply.choices[0].message.content == expected
    for url in ("../../etc/passwd", "/etc/passwd", f"videos/../../{synthetic.name}/videos/{video.name}/../../../x"):
        with pytest.raises(openai.BadRequestError, match="outside the server's media root|no such file"):
            client.chat.completions.create(
                model=MODEL, messages=ask_about({"type": "video_url", "video_url": {"url": url}}, question), **GREEDY)


def test_remote_media_is_fetched_only_when_allowed(server, synthetic, cases):
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    video, question, expected = cases[0]
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(synthetic))
    handler.log_message = lambda *args: None
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = serve_engine(server.app.state.engine, media=MediaPolicy(allow_remote=True, max_bytes=2 << 20))
    base = f"http://127.0.0.1:{files.server_address[1]}/videos/"
    try:
        reply = remote.client().chat.completions.create(
            model=MODEL, messages=ask_about({"type": "video_url", "video_url": {"url": base + video.name}}, question),
            **GREEDY)
        assert reply.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            remote.client().chat.completions.create(
                model=MODEL, messages=ask_about({"type": "video_url", "video_url": {"url": base + "none.mp4"}},
                                                question), **GREEDY)
    finally:
        remote.close()
        files.shutdown()


def test_max_tokens_stop_and_seed(server, reference, cases):
    client = server.client()
    video, question, expected = cases[0]
    messages = ask_about(video_part(video), question)
    short = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert expected.startswith(short.choices[0].message.content)
    stop = expected.split()[1]
    cut = client.chat.completions.create(model=MODEL, messages=messages, stop=[stop], **GREEDY)
    assert cut.choices[0].message.content == expected[:expected.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, top_p=1.0, seed=seed,
                                              max_tokens=24).choices[0].message.content for seed in (3, 3, *range(4, 12))]
    assert sampled[0] == sampled[1] == engine_answer(reference, "video", video, question, temperature=1.0, top_p=1.0,
                                                     seed=3, max_new_tokens=24)
    assert len(set(sampled)) > 1   # other seeds, other answers


# ---------------------------------------------------------------- bad input, raw HTTP


def bad_requests(video, synthetic) -> dict:
    """name → (request body: a dict sent as JSON, or raw bytes; the status; the error code, or None)."""
    good_video = video_part(video)
    ask = lambda *parts, **extra: {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], **extra}
    text = lambda s: {"type": "text", "text": s}
    video_url = lambda url: {"type": "video_url", "video_url": {"url": url}}
    return {
        "malformed JSON": (b'{"model": "sft_video_32", "messages": [', 400, "invalid_json"),
        "not a JSON object": (b"[1, 2]", 400, "invalid_json"),
        "temperature a string": (ask(text("Hi"), temperature="hot"), 400, "float_type"),
        "messages not a list": ({"model": MODEL, "messages": "Hi"}, 400, "list_type"),
        "no model": ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "missing"),
        "unknown part type": (ask({"type": "audio_url", "audio_url": {"url": "x"}}), 400, "union_tag_invalid"),
        "unknown role": ({"model": MODEL, "messages": [{"role": "tool", "content": "Hi"}]}, 400, "literal_error"),
        "n = 2": (ask(text("Hi"), n=2), 400, "invalid_value"),
        "top_p 0": (ask(text("Hi"), top_p=0), 400, "greater_than"),
        "empty stop string": (ask(text("Hi"), stop=[""]), 400, "invalid_value"),
        "unknown model": ({**ask(text("Hi")), "model": "gpt-4o"}, 404, "model_not_found"),
        "corrupt video": (ask(video_url("data:video/mp4;base64," + base64.b64encode(os.urandom(4096)).decode()),
                              text("What?")), 400, "invalid_media"),
        "truncated video": (ask(video_url("data:video/mp4;base64," + base64.b64encode(video.read_bytes()[:600]).decode()),
                                text("What?")), 400, "invalid_media"),
        "not base64": (ask(video_url("data:video/mp4;base64,@@@not-base64@@@"), text("What?")), 400, "invalid_media_url"),
        "text as an image": (ask({"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                  + base64.b64encode(b"not a png" * 20).decode()}}, text("What?")), 400, "invalid_media"),
        "remote URL": (ask(video_url("http://127.0.0.1:9/clip.mp4"), text("What?")), 400, "remote_media_refused"),
        "path escape": (ask(video_url("../" * 8 + "etc/hostname"), text("What?")), 400, "invalid_media_url"),
        "media bytes over the limit": (ask(video_url("data:video/mp4;base64," + "A" * ((2 << 20) * 4 // 3 + 4)),
                                           text("What?")), 413, "media_too_large"),
        "body over the limit": (b"{" + b" " * (4 << 20) + b"}", 413, "request_too_large"),
        "prompt longer than the context": (ask(good_video, text("word " * 2100)), 400, "context_length_exceeded"),
        "a marker typed as text": (ask(text("<video>\nWhat happens?")), 400, "invalid_value"),
        "media in an assistant turn": ({"model": MODEL, "messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [good_video]},
            {"role": "user", "content": "And?"}]}, 400, "invalid_value"),
        "an assistant turn first": ({"model": MODEL, "messages": [{"role": "assistant", "content": "Hi"},
                                                                  {"role": "user", "content": "?"}]}, 400, "invalid_value"),
        "ending with the assistant": ({"model": MODEL, "messages": [{"role": "user", "content": "Hi"},
                                                                    {"role": "assistant", "content": "Hey"}]}, 400,
                                      "invalid_value"),
    }


def post(url, body, timeout=60):
    if isinstance(body, bytes):
        return httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                          timeout=timeout)
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def assert_openai_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert code is None or error["code"] == code, error
    return error


def test_bad_input_gets_a_4xx_openai_error_and_the_server_goes_on(server, synthetic, cases):
    video, question, expected = cases[0]
    good = {"model": MODEL, "messages": ask_about(video_part(video), question), **GREEDY}
    for name, (body, status, code) in bad_requests(video, synthetic).items():
        error = assert_openai_error(post(server.url, body), status, code)
        assert "serve-media-" not in error["message"], (name, error)   # no temporary file names
        answer = post(server.url, good)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == expected, name
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404, "not_found")
    assert_openai_error(httpx.delete(server.url + "/v1/chat/completions"), 405)
    assert_openai_error(httpx.get(server.url + "/v1/models/gpt-4o"), 404, "model_not_found")
    assert server.stats()["held"] == 0   # every refused request gave its place back


def test_too_many_frames_is_413(slow_engine, cases):
    video, question, _ = cases[0]
    running = serve_engine(slow_engine, media=MediaPolicy(max_video_frames=3))
    try:
        body = {"model": MODEL, "messages": ask_about(video_part(video), question), **GREEDY}
        assert "more than this server takes" in assert_openai_error(post(running.url, body), 413, "too_many_frames")["message"]
        assert post(running.url, {**body, "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
    finally:
        running.close()


# ---------------------------------------------------------------- under load


def test_six_concurrent_streaming_clients_each_get_their_own_answer(slow_server, reference, cases):
    asked = cases[:5] + [(cases[0][0], cases[0][1], engine_answer(reference, "video", cases[0][0], cases[0][1],
                                                                  temperature=1.0, top_p=1.0, seed=7))]
    results, errors, start = {}, [], threading.Barrier(len(asked))

    def client(i, video, question):
        sampling = dict(temperature=1.0, top_p=1.0, seed=7, max_tokens=64) if i == len(asked) - 1 else GREEDY
        try:
            start.wait()
            stream = slow_server.client().chat.completions.create(
                model=MODEL, messages=ask_about(video_part(video), question), stream=True, **sampling)
            results[i] = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        except Exception as e:   # reported below with the client it happened to
            errors.append(f"client {i}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=client, args=(i, v, q)) for i, (v, q, _) in enumerate(asked)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (_, _, expected) in enumerate(asked):
        assert "".join(results[i]) == expected, i
    assert slow_server.stats()["peak_rows"] >= 3   # they were decoded together


def wait_until(condition, timeout=10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_leaves_stops_its_generation(slow_server, cases):
    video, question, expected = cases[0]
    body = {"model": MODEL, "messages": ask_about(video_part(video), question), "stream": True, **GREEDY}
    before = slow_server.stats()
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content": "' in line and '"role"' not in line:
                break   # the first words arrived: leave
    assert wait_until(lambda: slow_server.stats()["cancelled"] == before["cancelled"] + 1)
    assert wait_until(lambda: slow_server.stats()["rows"] == 0 and slow_server.stats()["held"] == 0)
    assert slow_server.stats()["served"] == before["served"]   # its answer was never finished
    with pytest.raises(httpx.TimeoutException):   # a client that gives up on a whole (unstreamed) answer
        post(slow_server.url, {**body, "stream": False}, timeout=SLOW_STEP_S * 4)
    assert wait_until(lambda: slow_server.stats()["cancelled"] == before["cancelled"] + 2)
    assert post(slow_server.url, {**body, "stream": False}).json()["choices"][0]["message"]["content"] == expected


def test_a_full_queue_answers_429_and_the_server_recovers(slow_engine, cases):
    video, question, expected = cases[0]
    running = serve_engine(slow_engine, max_batch=1, max_queue=1)
    body = {"model": MODEL, "messages": ask_about(video_part(video), question), "stream": True, **GREEDY}
    try:
        with httpx.Client(timeout=60) as first, httpx.Client(timeout=60) as second:
            with first.stream("POST", running.url + "/v1/chat/completions", json=body) as decoding, \
                    second.stream("POST", running.url + "/v1/chat/completions", json=body) as waiting:
                assert decoding.status_code == waiting.status_code == 200
                full = post(running.url, {**body, "stream": False})
                assert_openai_error(full, 429, "queue_full")["type"] == "rate_limit_error"
                answers = ["".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                   for line in r.iter_lines() if line.startswith("data: {")) for r in (decoding, waiting)]
        assert answers == [expected, expected]
        assert post(running.url, {**body, "stream": False}).json()["choices"][0]["message"]["content"] == expected
    finally:
        running.close()


# ---------------------------------------------------------------- the command line


def test_the_command_line_serves_with_an_api_key(caption_checkpoint, cases):
    video, question, expected = cases[0]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.Popen([sys.executable, "scripts/serve_openai_api.py", "--weight", str(caption_checkpoint),
                                "--port", str(port), "--api_key", "sekret", "--device", "cpu", "--log_level", "warning"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: reachable(url), timeout=90), process.stdout.read() if process.poll() else "no answer"
        assert_openai_error(httpx.get(url + "/v1/models"), 401, "invalid_api_key")
        assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        assert_openai_error(post(url, {"model": MODEL, "messages": []}), 401)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=ask_about(video_part(video), question), **GREEDY)
        assert reply.choices[0].message.content == expected
    finally:
        process.terminate()
        process.wait(20)


def reachable(url) -> bool:
    try:
        httpx.get(url + "/v1/models", timeout=1)
        return True
    except httpx.TransportError:
        return False
