"""--wandb / --swanlab: the trackers get the same per-step records as out/logs/<run>.jsonl; a missing package or
a tracker that cannot start is one line, and training goes on."""
import sys
import types
from argparse import Namespace

import pytest

from conftest import read_log

# A stand-in tracker package: records what the trainer hands it (the services themselves need network).
FAKE_TRACKER = '''
import json, os
_path = os.environ["FAKE_TRACKER_OUT"]
def _write(entry):
    with open(_path, "a") as f:
        f.write(json.dumps(entry) + "\\n")
def init(**kwargs):
    _write({"init": kwargs})
def log(record, step=None):
    _write({"log": record, "step": step})
def finish():
    _write({"finish": True})
'''


def tracker_args(**flags):
    return Namespace(**{"wandb": False, "swanlab": False, "tracker_project": "p", **flags})


@pytest.mark.parametrize("flag", ["wandb", "swanlab"])
def test_a_missing_tracker_package_is_one_line_and_no_tracker(flag, monkeypatch, capsys):
    from trainer.trackers import open_trackers
    monkeypatch.setitem(sys.modules, flag, None)   # import fails as if not installed
    assert open_trackers(tracker_args(**{flag: True}), "run") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install {flag}" in err[0]


def test_a_tracker_that_cannot_reach_its_server_is_one_line(monkeypatch, capsys):
    from trainer.trackers import open_trackers
    offline = types.ModuleType("wandb")

    def init(**kwargs):
        raise ConnectionError("Failed to connect to api.wandb.ai\nretrying...")
    offline.init = init
    monkeypatch.setitem(sys.modules, "wandb", offline)
    assert open_trackers(tracker_args(wandb=True), "run") == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["note: --wandb: could not start (ConnectionError: Failed to connect to api.wandb.ai); "
                   "logging to out/logs only"]


def test_wandb_gets_the_same_per_step_records_as_the_log_file(tmp_path, synthetic, fresh_flags, train, monkeypatch):
    fake = tmp_path / "fake_packages"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_TRACKER)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("FAKE_TRACKER_OUT", str(calls))
    out = tmp_path / "out"
    result = train("train_sft.py", "--stage=video", f"--data_path={synthetic / 'sft_video.jsonl'}", f"--out_dir={out}",
                   *fresh_flags, "--max_steps=3", "--val_every=2", "--wandb", "--tracker_project=tiny-test")
    assert result.returncode == 0, result.stderr
    entries = read_log(calls)
    assert entries[0]["init"]["project"] == "tiny-test" and entries[0]["init"]["name"] == "sft_video_32"
    assert entries[0]["init"]["config"]["max_steps"] == 3
    logged = [e for e in entries if "log" in e]
    assert [e["log"] for e in logged] == read_log(out / "logs" / "sft_video_32.jsonl")
    assert [e["step"] for e in logged] == [1, 2, 3] and "val_loss" in logged[1]["log"]
    assert entries[-1] == {"finish": True}
