"""scripts/web_demo.py: a headless Chromium uploads a video, asks, reads the streamed answer and takes a screenshot;
several users at once (gradio_client) each get their own video's answer, streamed; bad uploads are one line."""
import shutil
import socket
import threading
import time

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUESTION = "What happens in the video?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(caption_checkpoint, tmp_path_factory):
    """The demo on 127.0.0.1 (its default host) over an out/ with the tiny video checkpoint and a copy of it
    under another name; (url, out dir)."""
    pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")
    import web_demo
    out = tmp_path_factory.mktemp("web") / "out"
    out.mkdir()
    for name in ("sft_video_32", "sft_video_32_copy"):
        shutil.copy(caption_checkpoint, out / f"{name}.safetensors")
    args = web_demo.parse_args(["--weight", "sft_video_32", "--out_dir", str(out), "--port", str(free_port()),
                                "--device", "cpu", "--max_upload_mb", "1"])
    assert args.host == "127.0.0.1"
    app, url = web_demo.launch(args, block=False)
    yield url, out
    app.close()


def eval_answer(checkpoint, video, question=QUESTION) -> str:
    """What eval.py answers (greedy, 64 new tokens: the page's defaults), through the Engine it uses."""
    from model.engine import Engine, SamplingOptions
    engine = Engine.load(weight=str(checkpoint), device="cpu")
    _, seen = engine.read_media(str(video), "video")
    return engine.reply([{"role": "user", "content": f"<video>\n{question}"}], [seen],
                        SamplingOptions(max_new_tokens=64, temperature=0)).strip()


def several_word_answer(checkpoint, synthetic):
    """(test video, question, eval.py's answer) for the test video the caption-trained checkpoint answers at
    greatest length: a sentence of many tokens, so the stream has partial states to see. (Its answers'
    lengths move a little with the machine's numerics, as test_serve's `cases` also allows for.)"""
    answers = [(video, eval_answer(checkpoint, video)) for video in sorted((synthetic / "videos").glob("t*.mp4"))]
    video, answer = max(answers, key=lambda pair: len(pair[1].split()))
    assert len(answer.split()) >= 3, answers
    return video, QUESTION, answer


def text_of(content) -> str:
    """A chat message's text: gradio hands it over as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def drive(url, media, question, screenshot, timeout_s=60):
    """In a headless Chromium: upload `media`, ask `question`, wait for the answer to stop growing, screenshot.

    Returns (the answer, every text the answer bubble showed on the way, the frame captions)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url)
            page.set_input_files("#upload input[type=file]", str(media))
            page.wait_for_selector("#frames img", timeout=timeout_s * 1000)
            captions = page.locator("#frames .caption-label").all_inner_texts()
            # Record every text the answer bubble shows, however briefly: the stream as the user saw it.
            page.evaluate("""() => { window.shown = [];
                new MutationObserver(() => { const m = document.querySelectorAll('#chat .message.bot');
                    if (m.length) window.shown.push(m[m.length - 1].innerText); })
                .observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true}); }""")
            page.fill("#question textarea", question)
            page.click("#send")
            page.wait_for_selector("#chat .message.bot", timeout=timeout_s * 1000)
            page.wait_for_function("() => !document.querySelector('#chat .generating, #chat .pending')",
                                   timeout=timeout_s * 1000)
            page.wait_for_function("""() => { const m = document.querySelectorAll('#chat .message.bot');
                const last = m[m.length - 1].innerText.trim();
                if (window.settled && window.settled.text === last) return Date.now() - window.settled.at > 500;
                window.settled = {text: last, at: Date.now()}; return false; }""", polling=100, timeout=timeout_s * 1000)
            answer = page.locator("#chat .message.bot").last.inner_text().strip()
            shown = [t.strip() for t in page.evaluate("window.shown")]
            page.screenshot(path=str(screenshot), full_page=True)
            return answer, shown, captions
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_browser_uploads_a_video_asks_and_reads_the_streamed_answer(server, synthetic, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright; no browser download)")
    url, out = server
    video, question, expected = several_word_answer(out / "sft_video_32.safetensors", synthetic)
    screenshot = tmp_path / "web_demo.png"
    answer, shown, captions = drive(url, video, question, screenshot)
    assert captions == [f"frame {i}/4" for i in range(1, 5)]   # the tiny model's 4 sampled frames
    assert answer == expected
    stream = [t for t in dict.fromkeys(shown) if t and t != "Loading content"]   # gradio's placeholder
    # The bubble grew through partial answers to the full one, and never showed anything else.
    assert len(stream) >= 2 and stream[-1] == answer and all(answer.startswith(t) for t in stream), stream
    assert screenshot.stat().st_size > 10_000


def test_concurrent_users_each_get_their_own_answer_streamed(server, synthetic):
    from gradio_client import Client, handle_file
    url, out = server
    videos = [synthetic / "videos" / f"t0000{i}.mp4" for i in range(3)]
    results, errors = {}, []
    start = threading.Barrier(len(videos))

    def user(video):
        try:
            client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
            client.predict(handle_file(str(video)), api_name="/upload")
            start.wait()   # every user asks at the same time
            job = client.submit(QUESTION, [], 64, 0, api_name="/ask")
            while not job.done():
                time.sleep(0.02)
            results[video] = [text_of(output[0][-1]["content"]) for output in job.outputs()]
        except Exception as e:   # reported below, with the video it happened to
            errors.append(f"{video.name}: {type(e).__name__}: {e}")
    threads = [threading.Thread(target=user, args=(v,)) for v in videos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for video in videos:
        texts = [t for t in results[video] if t]
        expected = eval_answer(out / "sft_video_32.safetensors", video)
        assert texts[-1] == expected   # this user's video, not another user's
        assert len(texts) > 2 and all(expected.startswith(t.strip()) for t in texts)   # streamed token by token


def test_bad_uploads_are_one_line_in_the_page(server, synthetic, tmp_path):
    from gradio_client import Client, handle_file
    import web_demo
    url, out = server
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    with pytest.raises(Exception, match=r"Invalid file type.*\.mp4"):   # refused before our code runs
        client.predict(handle_file(str(notes)), api_name="/upload")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 2048)
    status = client.predict(handle_file(str(broken)), api_name="/upload")[-1]
    assert status.startswith("**Error:**") and "broken.mp4" in status and "\n" not in status
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\x00" * 1_500_000)   # over the server's --max_upload_mb 1
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(big)), api_name="/upload")
    engine = web_demo.Models(str(out), "cpu").get(str(out / "sft_video_32.safetensors"))
    with pytest.raises(web_demo.DemoError, match="frames, more than this demo takes"):
        web_demo.load_media(engine, synthetic / "videos" / "t00000.mp4", max_video_frames=3)


def test_switching_checkpoints_keeps_the_video_and_restarts_the_chat(server, synthetic):
    from gradio_client import Client, handle_file
    import web_demo
    url, out = server
    assert set(web_demo.list_models(out)) == {"sft_video_32", "sft_video_32_copy"}
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    video = synthetic / "videos" / "t00002.mp4"
    client.predict(handle_file(str(video)), api_name="/upload")
    first = client.predict(QUESTION, [], 64, 0, api_name="/ask")[0]
    chat, gallery, status, info = client.predict(str(out / "sft_video_32_copy.safetensors"), api_name="/switch_model")
    assert chat == [] and len(gallery) == 4 and "t00002.mp4" in status and "sft_video_32_copy" in info
    again = client.predict(QUESTION, [], 64, 0, api_name="/ask")[0]
    # The copy has the same weights: the same answer about the same (kept) video, in a fresh chat.
    assert len(again) == 2 and text_of(again[-1]["content"]) == text_of(first[-1]["content"])
