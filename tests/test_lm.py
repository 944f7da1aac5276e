"""The decoder LM: KV cache, batched generation, GQA, RMSNorm, optional per-head q/k norm, tied embeddings, top-p
sampling."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import LMConfig, config_from_dict, config_to_dict
from model.lm import Attention, KVCache, LanguageModel, RMSNorm
from model.vlm import sample_next


def lively(model, std=0.5):
    """Re-initialise with large weights: a fresh tiny LM predicts almost the same token everywhere,
    which would let a generation test pass even if attention ignored the context."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, std)
    return model


def generate_all(model, ids, mask=None, n=8):
    return torch.stack(list(model.generate(ids, mask, max_new_tokens=n)), dim=1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_kv_cache_prefill_then_steps_matches_full_forward(make_vlm, qk_norm):
    lm = make_vlm(qk_norm=qk_norm).lm
    ids = torch.randint(4, 64, (2, 12))
    full = lm(lm.embed_tokens(ids))
    cache = KVCache(lm.cfg, 2, 12, "cpu", torch.float32)
    pieces = [lm(lm.embed_tokens(ids[:, :7]), cache=cache)]
    for i in range(7, 12):
        pieces.append(lm(lm.embed_tokens(ids[:, i:i + 1]), cache=cache))
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_to_overflow(make_vlm):
    lm = make_vlm().lm
    cache = KVCache(lm.cfg, 1, 4, "cpu", torch.float32)
    with pytest.raises(ValueError, match="KV cache full"):
        lm(lm.embed_tokens(torch.randint(4, 64, (1, 5))), cache=cache)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_greedy_generation_continues_the_full_forward_argmax(make_vlm, qk_norm):
    model = lively(make_vlm(qk_norm=qk_norm))
    ids = torch.randint(4, 64, (1, 6))
    tokens = generate_all(model, ids, n=6)[0]
    seq = ids[0].tolist()
    for token in tokens.tolist():   # each generated token is the argmax of a fresh full pass
        logits = model.lm(model.lm.embed_tokens(torch.tensor([seq])))
        assert token == int(logits[0, -1].argmax())
        seq.append(token)


def test_left_padded_batch_generates_the_same_tokens_as_each_row_alone(make_vlm):
    model = lively(make_vlm())
    torch.manual_seed(2)
    rows = [torch.randint(4, 64, (n,)) for n in (9, 4, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)   # 0 = pad id
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, True
    batched = generate_all(model, ids, mask)
    for i, r in enumerate(rows):
        alone = generate_all(model, r[None])[0]
        assert batched[i].tolist() == alone.tolist(), f"row {i}"
    assert len({tuple(t.tolist()) for t in batched}) > 1, "model too dull to tell rows apart"


def test_finished_rows_repeat_eos_and_generation_stops_when_all_are_done(make_vlm):
    model = lively(make_vlm())
    ids = torch.randint(4, 64, (1, 5)).repeat(2, 1)
    ids[1, 0] = (ids[1, 0] + 1) % 60 + 4   # row 1 differs from row 0
    greedy = generate_all(model, ids, n=6)
    eos = int(greedy[0, 0])
    assert eos not in greedy[1].tolist(), "pick another seed: row 1 also emits the eos"
    steps = torch.stack(list(model.generate(ids, max_new_tokens=6, eos_id=eos)), dim=1)
    assert steps.shape == (2, 6) and steps[0].tolist() == [eos] * 6
    assert steps[1].tolist() == greedy[1].tolist()
    same = list(model.generate(ids[:1].repeat(2, 1), max_new_tokens=6, eos_id=eos))
    assert len(same) == 1   # both rows done after their first token


def test_gqa_matches_multi_head_attention_with_repeated_kv_heads():
    torch.manual_seed(0)
    dim, heads, kv_heads = 32, 4, 2
    attn = Attention(dim, heads, kv_heads)
    assert attn.k_proj.weight.shape == (kv_heads * dim // heads, dim)
    assert attn.q_proj.weight.shape == (dim, dim)
    x = torch.randn(2, 5, dim)
    out = attn(x, causal=True)
    assert out.shape == x.shape

    hd = dim // heads
    q = attn.q_proj(x).view(2, 5, heads, hd).transpose(1, 2)
    k = attn.k_proj(x).view(2, 5, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    v = attn.v_proj(x).view(2, 5, kv_heads, hd).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, dim))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gqa_lm_has_fewer_kv_weights_and_full_size_logits():
    cfg = LMConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1,
                   intermediate_size=64, max_seq_len=32)
    lm = LanguageModel(cfg)
    assert lm.layers[0].attn.v_proj.weight.shape == (8, 32)
    assert lm(lm.embed_tokens(torch.randint(0, 50, (3, 7)))).shape == (3, 7, 50)


def test_qk_norm_is_off_unless_asked_so_configs_and_weights_from_before_it_load_unchanged():
    saved_before = {k: v for k, v in config_to_dict(LMConfig()).items() if k != "qk_norm"}
    assert not config_from_dict(LMConfig, saved_before).qk_norm
    small = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    plain = LanguageModel(LMConfig(**small)).state_dict()
    normed = LanguageModel(LMConfig(**small, qk_norm=True)).state_dict()
    assert not any("q_norm" in k or "k_norm" in k for k in plain)
    assert {k: tuple(v.shape) for k, v in normed.items() if k not in plain} == {
        f"layers.{i}.attn.{n}_norm.weight": (8,) for i in range(2) for n in "qk"}   # one weight per head dim


def test_heads_that_do_not_divide_are_rejected():
    with pytest.raises(ValueError):
        Attention(32, 4, 3)


def test_rmsnorm_scales_to_unit_rms_then_by_weight():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8) * 5 + 2
    expected = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_embeddings_are_tied(make_vlm):
    lm = make_vlm().lm
    assert lm.lm_head.weight is lm.embed_tokens.weight
    with torch.no_grad():
        lm.embed_tokens.weight[5].fill_(7.0)
    assert torch.all(lm.lm_head.weight[5] == 7.0)


def test_top_p_never_samples_outside_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])   # top_p 0.7 → nucleus {0, 1}
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)
    assert set(picks.tolist()) == {0, 1}
    share = (picks == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05   # renormalised inside the nucleus


def test_tiny_top_p_keeps_only_the_top_token_and_zero_temperature_is_argmax():
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]]).expand(500, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 0.01, gen).tolist()) == {1}
    assert set(sample_next(logits, 0.0, 1.0).tolist()) == {1}


def test_full_sampling_reaches_every_token():
    logits = torch.zeros(2000, 4)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, 1.0, gen).tolist()) == {0, 1, 2, 3}


def test_rope_makes_attention_depend_on_relative_position(make_vlm):
    # Shifting every position by the same offset must not change the logits.
    lm = lively(make_vlm()).lm
    x = lm.embed_tokens(torch.randint(4, 64, (1, 6)))
    base = lm(x, position_ids=torch.arange(6)[None])
    shifted = lm(x, position_ids=torch.arange(10, 16)[None])
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)
    scrambled = lm(x, position_ids=torch.tensor([[0, 2, 1, 3, 5, 4]]))
    assert not torch.allclose(base, scrambled, atol=1e-3)


def test_loss_ignores_minus_100_labels(make_vlm):
    model = make_vlm()
    ids = torch.randint(4, 64, (1, 8))
    labels = ids.clone()
    labels[0, :5] = -100
    loss_sum, count = model(ids, labels)
    logits = model(ids)
    expected = F.cross_entropy(logits[0, 4:7], ids[0, 5:8], reduction="sum")
    assert int(count) == 3
    torch.testing.assert_close(loss_sum, expected)
