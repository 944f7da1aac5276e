"""Static-shape decoding (model/static_decode.py): the same tokens as the eager path, for plain and
left-padded prompts, greedy and sampled, with an end token; a failed compile falls back in one line."""
import pytest
import torch

from conftest import tiny_vlm
from model.static_decode import STATIC_BUCKET, static_size


def tokens(model, ids, mask=None, compiled=False, **options):
    steps = model.generate(ids, mask, max_new_tokens=20, compiled=compiled, **options)
    return torch.stack(list(steps), dim=1).tolist()


def eager_static(model):
    """The static path with its compiled step switched to the eager one (fast to test many cases)."""
    from model.static_decode import CompiledSteps
    model._compiled_steps = CompiledSteps(model.lm)
    model._compiled_steps.failed = True
    return model


@pytest.mark.parametrize("options", [{}, {"temperature": 0.8, "top_p": 0.9}, {"eos_id": 7}])
def test_static_steps_give_the_eager_tokens(options):
    model = eager_static(tiny_vlm(seed=3))
    ids = torch.randint(4, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[1, :4] = 0
    mask = ids != 0   # row 1 left-padded
    sampled = "temperature" in options
    def run(compiled):
        extra = {"generator": torch.Generator().manual_seed(5)} if sampled else {}
        return tokens(model, ids, mask, compiled, **options, **extra)
    assert run(True) == run(False)
    plain = ids[:1]
    assert tokens(model, plain, compiled=True) == tokens(model, plain)


def test_cache_sizes_are_bucketed_and_capped():
    assert static_size(1, 2048) == STATIC_BUCKET and static_size(STATIC_BUCKET + 1, 2048) == 2 * STATIC_BUCKET
    assert static_size(2000, 2048) == 2048 and static_size(60, 64) == 64


def test_a_compile_that_fails_falls_back_in_one_line(monkeypatch, capsys):
    import model.static_decode as static_decode
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")
    monkeypatch.setattr(static_decode.torch, "compile", lambda fn, **kwargs: broken)
    model = tiny_vlm(seed=3)
    ids = torch.randint(4, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    assert tokens(model, ids, compiled=True) == tokens(model, ids)
    assert capsys.readouterr().err.splitlines() == [
        "warning: compiled decoding failed (RuntimeError: no C++ compiler found); decoding eagerly"]
