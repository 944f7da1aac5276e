"""scripts/visualize.py: the frames figure answers as eval.py does; curves draw one loss panel (+ lr) for several runs."""
import json

import pytest
from PIL import Image


def write_log(path, losses, lr=1e-3, val_at=None):
    rows = [{"step": i + 1, "loss": loss, "lr": lr * (i + 1) / len(losses), "tok_s": 1.0, "skipped": 0}
            for i, loss in enumerate(losses)]
    if val_at:
        rows[val_at - 1]["val_loss"] = losses[val_at - 1] * 1.1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_curves_of_several_runs_have_a_loss_and_an_lr_panel(tmp_path):
    import visualize
    logs = tmp_path / "logs"
    logs.mkdir()
    write_log(logs / "sft_video_32.jsonl", [3.0, 2.0, 1.5, 1.2], val_at=4)
    write_log(logs / "sft_video_32_lora.jsonl", [3.0, 2.5, 2.0, 1.8], lr=2e-3)
    both, loss_only = tmp_path / "both.png", tmp_path / "loss.png"
    visualize.main(["curves", "--runs", "sft_video_32", "sft_video_32_lora", "--log_dir", str(logs), "--out", str(both)])
    visualize.main(["curves", "--log_dir", str(logs), "--no_lr", "--out", str(loss_only)])
    # 4.2 inches per panel at 110 dpi: two panels, then one.
    assert Image.open(both).size[0] == 2 * Image.open(loss_only).size[0] == 2 * 462


def test_curves_of_a_missing_run_name_what_is_there(tmp_path, capsys):
    import visualize
    (tmp_path / "logs").mkdir()
    write_log(tmp_path / "logs" / "pretrain_vlm_32.jsonl", [2.0, 1.0])
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["curves", "--runs", "nope", "--log_dir", str(tmp_path / "logs"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "nope" in err[0] and "pretrain_vlm_32" in err[0]


def test_frames_figure_shows_every_sampled_frame_and_eval_s_answers(video_checkpoint, synthetic, tmp_path, capsys):
    import eval as evaluation
    import visualize
    video = synthetic / "videos" / "v00001.mp4"
    questions = ["What happens in the video?", "What colour is the shape?"]
    png = tmp_path / "frames.png"
    args = visualize.parse_args(["frames", "--weight", str(video_checkpoint), "--video", str(video),
                                 "--question", *questions, "--max_new_tokens", "16", "--out", str(png)])
    answers = visualize.frames_figure(args)
    assert [q for q, _ in answers] == questions
    evaluation.main(["--weight", str(video_checkpoint), "--video", str(video), "--prompt", questions[1],
                     "--max_new_tokens", "16", "--device", "cpu"])
    assert answers[1][1] and answers[1][1] == capsys.readouterr().out.strip()
    # The tiny model samples 4 frames: four 2.1-inch columns at 100 dpi (give or take the margins).
    assert abs(Image.open(png).size[0] - 4 * 210) < 60
