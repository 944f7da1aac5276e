"""lmms-eval through scripts/run_lmms_eval.py: the wrapper's answers, accuracy and mIoU equal eval.py's on the same
records, options scored by likelihood, no network touched; the wrapper's pieces in-process."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_python

pytest.importorskip("lmms_eval")
from benchmarks import local_tasks  # noqa: E402
from benchmarks.lmms_model import (TinyVideoSimple, chat_turns, sampling_options, user_turn,  # noqa: E402
                                   visual_kind)
from model.engine import EngineError  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1"}
# Runs the script with the offline settings and every connection or name lookup beyond this machine
# refused and written down, so a run that reached for the network (and carried on) still fails the test.
GUARDED = """
import os, runpy, socket, sys
log, script, *argv = sys.argv[1:]
os.environ.update({env})
LOCAL = (None, "localhost", "127.0.0.1", "::1", "0.0.0.0", "")

def refuse(what):
    with open(log, "a") as f:
        f.write(what + "\\n")
    raise OSError("network refused by the test: " + what)

connect, lookup = socket.socket.connect, socket.getaddrinfo
def guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
        refuse(f"connect {{address}}")
    return connect(self, address)
def guarded_lookup(host, *args, **kwargs):
    if host not in LOCAL:
        refuse(f"lookup {{host}}")
    return lookup(host, *args, **kwargs)
socket.socket.connect, socket.getaddrinfo = guarded_connect, guarded_lookup
sys.argv = [script, *argv]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))   # as `python script` does
runpy.run_path(script, run_name="__main__")
""".format(env=repr(OFFLINE))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def task_yaml(folder: Path, name: str, base: str, data: Path) -> None:
    """A task of our own on `data`, the way the README says: include a local task, point it at the file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(
        f"include: {ROOT / 'benchmarks' / 'tasks' / base}\ntask: {name}\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"lmms_eval_specific_kwargs:\n  default:\n    media_root: {data.parent}\n")


def run_lmms_eval(tmp, checkpoint, tasks, *flags):
    """(CompletedProcess, results json, {task: samples sorted by doc_id}, what the guard refused)."""
    out, log = tmp / "out", tmp / "network.log"
    result = run_python("-c", GUARDED, log, "scripts/run_lmms_eval.py", f"--weight={checkpoint}",
                        f"--tasks={','.join(tasks)}", f"--include_path={tmp / 'tasks'}", f"--output_path={out}",
                        "--log_samples", *flags, "--verbosity=WARNING", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = {t: sorted(read_jsonl(next(out.rglob(f"*_samples_{t}.jsonl"))), key=lambda s: s["doc_id"]) for t in tasks}
    return result, results, samples, log.read_text() if log.exists() else ""


@pytest.fixture(scope="module")
def temporal(tmp_path_factory) -> Path:
    """A small temporal suite: multi-turn follow-ups and grounding questions with spans."""
    import dataset.synthetic_temporal as st
    out = tmp_path_factory.mktemp("temporal_lmms")
    settings = st.Settings(fps=4, size=64, min_seconds=4, max_seconds=12, test_max_seconds=16, codec=st.pick_codec())
    st.generate(out, 4, 4, 0, settings, workers=1)
    return out


@pytest.fixture(scope="module")
def eval_py_preds(video_checkpoint, synthetic, temporal, tmp_path_factory):
    """eval.py --data_path's predictions (and metrics) on both test splits, at its defaults."""
    out, found = tmp_path_factory.mktemp("eval_py"), {}
    for name, data in (("synthetic", synthetic), ("temporal", temporal)):
        result = run_python("eval.py", f"--weight={video_checkpoint}", f"--data_path={data / 'test.jsonl'}",
                            f"--out={out / name}.jsonl", f"--metrics_out={out / name}.json")
        assert result.returncode == 0, result.stderr
        found[name] = read_jsonl(out / f"{name}.jsonl"), json.loads((out / f"{name}.json").read_text())
    return found


@pytest.fixture(scope="module")
def chat_run(video_checkpoint, synthetic, temporal, tmp_path_factory):
    """Both generation tasks through lmms-eval's default (chat) model type."""
    tmp = tmp_path_factory.mktemp("lmms_chat")
    task_yaml(tmp / "tasks", "syn_gen", "tiny_synthetic/tiny_synthetic.yaml", synthetic / "test.jsonl")
    task_yaml(tmp / "tasks", "temporal_gen", "tiny_temporal/tiny_temporal.yaml", temporal / "test.jsonl")
    return run_lmms_eval(tmp, video_checkpoint, ["syn_gen", "temporal_gen"])


@pytest.fixture(scope="module")
def simple_run(video_checkpoint, synthetic, tmp_path_factory):
    """The multiple-choice task and the generation task through the simple type (--force_simple)."""
    tmp = tmp_path_factory.mktemp("lmms_simple")
    task_yaml(tmp / "tasks", "syn_mc", "tiny_synthetic/tiny_synthetic_mc.yaml", synthetic / "test.jsonl")
    task_yaml(tmp / "tasks", "syn_gen_simple", "tiny_synthetic/tiny_synthetic.yaml", synthetic / "test.jsonl")
    return run_lmms_eval(tmp, video_checkpoint, ["syn_mc", "syn_gen_simple"], "--force_simple")


def same_answers(samples, preds):
    assert len(samples) == len(preds)
    assert [s["filtered_resps"] for s in samples] == [p["prediction"] for p in preds]
    assert [s["exact_match"] for s in samples] == [float(p["correct"]) for p in preds]


def test_chat_type_gives_eval_py_answers_and_accuracy_to_the_sample(chat_run, eval_py_preds):
    _, results, samples, _ = chat_run
    preds, metrics = eval_py_preds["synthetic"]
    same_answers(samples["syn_gen"], preds)
    assert 0 < sum(p["correct"] for p in preds) < len(preds)   # a figure that could have differed
    assert results["results"]["syn_gen"]["exact_match,none"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert round(results["results"]["syn_gen"]["exact_match,none"], 4) == metrics["accuracy"]


def test_temporal_follow_ups_and_grounding_match_eval_py(chat_run, eval_py_preds):
    _, results, samples, _ = chat_run
    preds, metrics = eval_py_preds["temporal"]
    assert any(p["category"] == "followup" for p in preds) and metrics["grounding"]["n"] > 0
    same_answers(samples["temporal_gen"], preds)
    assert [s.get("miou") for s in samples["temporal_gen"]] == [p.get("iou") for p in preds]
    assert round(results["results"]["temporal_gen"]["miou,none"], 4) == metrics["grounding"]["miou"]
    assert round(results["results"]["temporal_gen"]["exact_match,none"], 4) == metrics["accuracy"]


def test_simple_type_gives_the_same_answers(simple_run, eval_py_preds):
    same_answers(simple_run[2]["syn_gen_simple"], eval_py_preds["synthetic"][0])


def test_multiple_choice_picks_the_likeliest_option(simple_run, eval_py_preds, synthetic):
    import datasets
    _, results, samples, _ = simple_run
    docs = local_tasks.with_choices(datasets.load_dataset("json", data_files=str(synthetic / "test.jsonl"),
                                                          split="train"))
    assert len(samples["syn_mc"]) == len(docs) > 0
    predicted = {p["id"]: p["prediction"] for p in eval_py_preds["synthetic"][0]}
    right = 0
    for sample, doc in zip(samples["syn_mc"], docs):
        nll = [float(v) for v, _ in sample["filtered_resps"]]
        greedy = [g == "True" for _, g in sample["filtered_resps"]]
        assert len(nll) == len(doc["choices"]) >= 2 and min(nll) > 0
        assert int(sample["target"]) == doc["choices"].index(doc["conversations"][-1]["content"])
        # The option greedy decoding would write is the answer eval.py wrote.
        assert [c for c, g in zip(doc["choices"], greedy) if g] == [c for c in doc["choices"] if c == predicted[doc["id"]]]
        right += int(np.argmin(nll)) == int(sample["target"])
    assert results["results"]["syn_mc"]["acc,none"] == pytest.approx(right / len(docs))


def test_nothing_reached_for_the_network(chat_run, simple_run):
    assert chat_run[3] == "" and simple_run[3] == ""


# ---------------------------------------------------------------- the script's edges

def test_without_lmms_eval_one_line_and_exit_2():
    code = ("import runpy, sys; sys.modules['lmms_eval'] = None; sys.path.insert(0, 'scripts'); sys.argv = ['run_lmms_eval.py', '--weight=x', "
            "'--tasks=t']; runpy.run_path('scripts/run_lmms_eval.py', run_name='__main__')")
    result = run_python("-c", code)
    assert result.returncode == 2
    assert result.stderr.strip() == "scripts/run_lmms_eval.py needs lmms-eval (pip install lmms-eval)"


def test_missing_checkpoint_is_one_line(tmp_path, synthetic):
    task_yaml(tmp_path / "tasks", "syn_gen", "tiny_synthetic/tiny_synthetic.yaml", synthetic / "test.jsonl")
    result = run_python("scripts/run_lmms_eval.py", f"--weight={tmp_path / 'none.safetensors'}", "--tasks=syn_gen",
                        f"--include_path={tmp_path / 'tasks'}", "--verbosity=WARNING")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "none.safetensors" in lines[-1] and "Traceback" not in result.stderr


# ---------------------------------------------------------------- in-process pieces

@pytest.fixture(scope="module")
def wrapper(video_checkpoint):
    return TinyVideoSimple(weight=str(video_checkpoint), device="cpu", batch_size=4)


def test_likelihoods_in_a_batch_equal_one_row_at_a_time(wrapper, synthetic):
    video = str(synthetic / "videos" / "t00000.mp4")
    rows = [([{"role": "user", "content": "<video>\nWhich colour is the ring?"}], [video], answer)
            for answer in ("green", "a red square moves left", "two")]
    batched = wrapper.likelihoods(rows)
    wrapper.batch_size = 1
    try:
        single = wrapper.likelihoods(rows)
    finally:
        wrapper.batch_size = 4
    assert [g for _, g in batched] == [g for _, g in single]
    assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in single], abs=1e-4)
    assert all(lp < 0 for lp, _ in batched)


def test_eval_py_answer_is_the_greedy_continuation(wrapper, synthetic, eval_py_preds):
    records = {r["id"]: r for r in read_jsonl(synthetic / "test.jsonl")}
    short = next(p for p in eval_py_preds["synthetic"][0] if 0 < len(p["prediction"].split()) <= 3)
    record = records[short["id"]]
    rows = [(record["conversations"][:-1], [str(synthetic / record["video"])], short["prediction"])]
    (logprob, greedy), = wrapper.likelihoods(rows)
    assert greedy and logprob < 0


def test_images_and_decoded_frames_as_visuals(wrapper, synthetic):
    from PIL import Image
    image_path = next((synthetic / "images").iterdir())
    with Image.open(image_path) as im:
        pil = im.convert("RGB")
    from_file, from_pil = wrapper.seen(str(image_path)), wrapper.seen(pil)
    assert torch.allclose(from_file.values, from_pil.values, atol=1e-5)
    frames = [pil] * 7
    seen = wrapper.seen(frames)
    assert seen.values.shape[0] == wrapper.engine.model.vision_cfg.num_frames and seen.times is None
    assert wrapper.answer([([user_turn("What colour is it?", [pil])], [pil])], {"max_new_tokens": 4})


def test_visual_kinds_and_refusals():
    assert visual_kind("a/b.MP4") == "video" and visual_kind("a/b.jpg") == "image"
    assert visual_kind(np.zeros((4, 8, 8, 3), np.uint8)) == "video"
    with pytest.raises(EngineError, match="segments"):
        visual_kind({"path": "a.mp4", "video_start": 1.0})
    with pytest.raises(EngineError, match="segments"):
        chat_turns([{"role": "user", "content": [{"type": "video", "url": "a.mp4", "start_time": 2.0}]}])


def test_records_round_trip_through_chat_messages():
    doc = {"video": "videos/v.mp4", "image": ["i.png"],
           "conversations": [{"role": "user", "content": "Look: <image>\nand <video>\nWhat moves?"},
                             {"role": "assistant", "content": "a circle"},
                             {"role": "user", "content": "Which way?"}, {"role": "assistant", "content": "left"}]}
    kwargs = {"media_root": "/data"}
    conversation, visuals = chat_turns(local_tasks.doc_to_messages(doc, kwargs))
    assert conversation == doc["conversations"][:-1]
    assert visuals == ["/data/i.png", "/data/videos/v.mp4"]
    assert local_tasks.doc_to_text(doc, kwargs) == "Which way?" and local_tasks.doc_to_visual(doc, kwargs) == []
    single = {"video": "v.mp4", "conversations": [{"role": "user", "content": "<video>\nWhat?"},
                                                  {"role": "assistant", "content": "x"}]}
    visuals = local_tasks.doc_to_visual(single, kwargs)
    assert user_turn(local_tasks.doc_to_text(single, kwargs), visuals) == single["conversations"][0]


def test_generation_kwargs_become_our_options():
    assert sampling_options({"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": []}) == \
        sampling_options({"max_new_tokens": 8})
    greedy = sampling_options({"max_new_tokens": 8, "until": ["\n\n", ""]})
    assert greedy.temperature == 0 and greedy.stop == ("\n\n",) and greedy.max_new_tokens == 8
    sampled = sampling_options({"do_sample": True, "temperature": 0.7, "top_p": 0.5, "until": "Q:"})
    assert (sampled.temperature, sampled.top_p, sampled.stop) == (0.7, 0.5, ("Q:",))


def test_multiple_choice_options_are_the_categorys_answers():
    import datasets
    rows = [{"id": str(i), "category": c, "span": None, "references": None,
             "conversations": [{"role": "user", "content": "<video>\nQ"}, {"role": "assistant", "content": a}]}
            for i, (c, a) in enumerate([("colour", "red"), ("colour", "blue"), ("colour", "red"),
                                        ("caption", "A red circle."), ("caption", "A blue ring."), ("count", "one")])]
    docs = local_tasks.with_choices(datasets.Dataset.from_list(rows))
    assert [d["id"] for d in docs] == ["0", "1", "2"]   # captions (free answers) and one-answer categories go
    assert all(d["choices"] == ["blue", "red"] for d in docs)
    assert [local_tasks.doc_to_choice_index(d) for d in docs] == [1, 0, 1]


def test_our_flags_become_model_args_and_lmms_eval_flags_pass_through():
    from run_lmms_eval import lmms_eval_argv, parse_args
    argv = lmms_eval_argv(*parse_args(["--weight=w", "--tasks=t", "-b", "4", "--model_args=lora=a", "--limit", "3"]))
    assert argv[:4] == ["--tasks=t", "-b", "4", "--limit"] and "--batch_size" not in argv
    assert argv[argv.index("--model") + 1] == "tiny_video_llm"
    assert argv[argv.index("--model_args") + 1] == "weight=w,out_dir=out,lora=a"
    argv = lmms_eval_argv(*parse_args(["--weight=w", "--tasks=t"]))
    assert argv[argv.index("--batch_size") + 1] == "32"   # eval.py's batches, unless asked otherwise
