"""Exact resume: runs killed with SIGKILL at random steps resume to bitwise the same weights; kills
during a save leave no half file; a resume state from other settings or carrying pickled code is refused."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import trainer.cli
from conftest import ROOT, read_log
from model.atomic import remove_stale_temps, write_safetensors
from model.weights_io import load_torch_file

NAME = "sft_video_32"
STEPS = 30


def kill_flags(synthetic, fresh_flags, feature_cache, out, data):
    # Dropout makes every step draw from the RNG, and a loader worker makes the loader's own seed
    # matter: a resume that restored less than all of it would drift. Long and short samples mixed, so
    # batches are packed (the default). 22 samples / batch 4 = 6 steps an epoch: the run crosses 4 epoch
    # boundaries (reshuffles).
    return ["train_sft.py", "--stage=video", f"--data_path={data}", f"--media_root={synthetic}", *fresh_flags,
            f"--feature_dir={feature_cache}", f"--max_steps={STEPS}", "--save_every=1", "--dropout=0.1",
            "--num_workers=1", "--learning_rate=1e-2", "--warmup_steps=3", f"--out_dir={out}"]


def launch(args):
    # One thread: the same kernels split the same way in every run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def logged_steps(log) -> int:
    if not log.exists():
        return 0
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def kill_at_step(proc, log, step, rng, timeout=180):
    """SIGKILL the run a random moment (0–30 ms) after its log shows `step`: mid-step or mid-save."""
    deadline = time.monotonic() + timeout
    while logged_steps(log) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "run too slow"
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    return proc.returncode


def visible_files_are_whole(out):
    """Every file a reader would pick up is complete: atomic writes show old or new, never half."""
    for path in out.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.name.endswith(".resume.pt"):
            load_torch_file(path)
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_killed_at_random_steps_resume_to_bitwise_identical_weights(tmp_path, synthetic, fresh_flags,
                                                                          feature_cache, mixed_lengths):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    uninterrupted = launch(kill_flags(synthetic, fresh_flags, feature_cache, straight, mixed_lengths))
    log = killed / "logs" / f"{NAME}.jsonl"
    rng = random.Random(20240601)
    kills = []
    # One run killed three times at random steps, each time resumed from what the kill left.
    for trial in range(3):
        step = logged_steps(log) + rng.randint(2, 7)
        proc = launch(kill_flags(synthetic, fresh_flags, feature_cache, killed, mixed_lengths) + (["--resume"] if trial else []))
        assert kill_at_step(proc, log, step, rng) == -signal.SIGKILL
        kills.append(logged_steps(log))
        visible_files_are_whole(killed)
    assert kills[-1] < STEPS
    # A temp file a killed save left behind (its writer is gone) is cleared by the next run.
    stale = killed / f".{NAME}.safetensors.tmp{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    proc = launch(kill_flags(synthetic, fresh_flags, feature_cache, killed, mixed_lengths) + ["--resume"])
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    _, err = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err[-3000:]

    assert not [p.name for p in killed.rglob(".*")]
    resumed_log, straight_log = read_log(log), read_log(straight / "logs" / f"{NAME}.jsonl")
    assert [r["step"] for r in resumed_log] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in straight_log]
    resumed, reference = load_file(str(killed / f"{NAME}.safetensors")), load_file(str(straight / f"{NAME}.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), kills


WRITER = """
import sys, time
from model.atomic import atomic_write

def write_slowly(tmp):
    with open(tmp, "wb") as f:
        f.write(b"new" * 1000)
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
        f.write(b"end")

atomic_write(sys.argv[1], write_slowly)
"""


def test_a_kill_during_a_save_leaves_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old checkpoint")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"old checkpoint"
    leftovers = list(tmp_path.glob(f".{target.name}.tmp*"))
    assert len(leftovers) == 1   # the half file is hidden beside it, under the dead writer's pid
    assert remove_stale_temps(tmp_path, target.name) == leftovers and not leftovers[0].exists()


def test_a_safetensors_save_shows_only_the_file_and_a_temp_the_next_run_clears(tmp_path):
    # A kill at any moment of the save leaves nothing unclaimed. safetensors' own save_file (0.8+) would
    # show a .tmpXXXXXX of its own here, which nothing clears.
    seen, done = set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.update(os.listdir(tmp_path))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        write_safetensors(tmp_path / "x.safetensors", {"w": torch.zeros(50_000_000)}, {"kind": "test"})
    finally:
        done.set()
        watcher.join()
    temps = seen - {"x.safetensors"}
    assert temps, "the watcher never saw the save in progress"
    assert all(re.fullmatch(r"\.x\.safetensors\.tmp\d+", name) for name in temps), temps
    assert load_file(str(tmp_path / "x.safetensors"))["w"].shape == (50_000_000,)


def test_the_temp_file_of_a_live_writer_is_kept(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = tmp_path / f".x.safetensors.tmp{proc.pid}"
        live.write_bytes(b"being written")
        assert remove_stale_temps(tmp_path, "x.safetensors") == [] and live.exists()
    finally:
        proc.kill()
        proc.wait()


def train_in_process(monkeypatch, capsys, *flags):
    """trainer.main as train_sft.py runs it → (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train_sft.py", *map(str, flags)])
    try:
        trainer.cli.main(("image", "video"), lr=5e-4, epochs=3, batch_size=32)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def saved_run(tmp_path, synthetic, fresh_flags, feature_cache, monkeypatch, capsys):
    flags = ["--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}", *fresh_flags,
             f"--feature_dir={feature_cache}", "--max_steps=2", f"--out_dir={tmp_path}"]
    code, err = train_in_process(monkeypatch, capsys, *flags)
    assert code == 0, err
    return flags


def test_resume_without_a_saved_state_is_one_error_line(tmp_path, synthetic, fresh_flags, feature_cache, monkeypatch,
                                                         capsys):
    code, err = train_in_process(monkeypatch, capsys, "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}",
                                 *fresh_flags, f"--feature_dir={feature_cache}", f"--out_dir={tmp_path}", "--resume")
    assert code == 1 and err == f"error: --resume: {tmp_path / NAME}.resume.pt not found\n"


@pytest.mark.parametrize("change, named", [("--batch_size=2", "batch_size"), ("--seed=1", "seed"),
                                           ("--accumulation_steps=2", "accumulation_steps")])
def test_resuming_with_settings_that_move_the_data_position_is_refused(saved_run, monkeypatch, capsys, change, named):
    code, err = train_in_process(monkeypatch, capsys, *saved_run, "--max_steps=4", "--resume", change)
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and err.startswith("error: --resume:") and named in err


class WritesAMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_resume_state_carrying_a_pickle_payload_is_refused_and_never_runs(saved_run, tmp_path, monkeypatch,
                                                                             capsys):
    marker = tmp_path / "payload_ran"
    state = torch.load(tmp_path / f"{NAME}.resume.pt", weights_only=True)
    torch.save({**state, "payload": WritesAMarker(marker)}, tmp_path / f"{NAME}.resume.pt")
    code, err = train_in_process(monkeypatch, capsys, *saved_run, "--max_steps=4", "--resume")
    assert code == 1 and "refused" in err and f"{NAME}.resume.pt" in err and err.strip().count("\n") == 0
    assert not marker.exists()
