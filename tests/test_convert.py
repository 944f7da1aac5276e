"""LM weights in and out: MiniMind .pth → ours (MiniMind2's interleaved RoPE permuted, minimind-3's q/k norms),
HF Llama and Qwen3 folders ↔ ours, refusals."""
import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import run_python
from model.checkpoint import CheckpointError, load_checkpoint
from model.convert import (MINIMIND_NAMES, ConversionError, infer_config, load_into, read_hf_folder, read_lm,
                           read_ours, rename_in)
from model.lm import LanguageModel

DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 32, 2, 4, 2, 64, 96
THETA, EPS = 1e6, 1e-5
EPS3 = 1e-6   # minimind-3's RMSNorm epsilon (its model code's default, which the converter must pick)


def build_lm(cfg, state) -> LanguageModel:
    """A stand-alone LM (eval mode) holding these weights."""
    return load_into(LanguageModel(cfg), state).eval()


# ---------------------------------------------------------------- an independent MiniMind reference

def weight_drawer(seed, dtype):
    """w(*shape, std) → seeded normal weights in dtype (fp16: as MiniMind's trainers save them)."""
    g = torch.Generator().manual_seed(seed)
    return lambda *shape, std=0.3: (torch.randn(*shape, generator=g) * std).to(dtype)


def minimind_state(seed=0, dtype=torch.float16, vocab=VOCAB) -> dict:
    """Random weights under MiniMind2 model.py's names; output.weight is tokens' embedding (tied)."""
    w = weight_drawer(seed, dtype)
    head_dim = DIM // HEADS
    sd = {"tok_embeddings.weight": w(vocab, DIM, std=1.0), "norm.weight": 1 + w(DIM, std=0.1)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        sd.update({p + "attention_norm.weight": 1 + w(DIM, std=0.1), p + "ffn_norm.weight": 1 + w(DIM, std=0.1),
                   p + "attention.wq.weight": w(HEADS * head_dim, DIM), p + "attention.wk.weight": w(KV_HEADS * head_dim, DIM),
                   p + "attention.wv.weight": w(KV_HEADS * head_dim, DIM), p + "attention.wo.weight": w(DIM, HEADS * head_dim),
                   p + "feed_forward.w1.weight": w(HIDDEN, DIM), p + "feed_forward.w2.weight": w(DIM, HIDDEN),
                   p + "feed_forward.w3.weight": w(HIDDEN, DIM)})
    sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def minimind_logits(sd: dict, ids):
    """MiniMind2's forward pass written out: complex (interleaved) RoPE via torch.polar, GQA by repetition."""
    sd = {k: v.float() for k, v in sd.items()}
    B, L = ids.shape
    head_dim = DIM // HEADS
    freqs = 1.0 / THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
    pos_cis = torch.polar(torch.ones(L, head_dim // 2), torch.outer(torch.arange(L).float(), freqs))

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))

    def rope(x):   # (B, L, H, D): adjacent dims (2i, 2i+1) are one complex number
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3)

    h = sd["tok_embeddings.weight"][ids]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q = rope((x @ sd[p + "attention.wq.weight"].T).view(B, L, HEADS, head_dim))
        k = rope((x @ sd[p + "attention.wk.weight"].T).view(B, L, KV_HEADS, head_dim))
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, L, KV_HEADS, head_dim)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + causal
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, DIM)
        h = h + out @ sd[p + "attention.wo.weight"].T
        x = rms(h, sd[p + "ffn_norm.weight"])
        h = h + (F.silu(x @ sd[p + "feed_forward.w1.weight"].T) * (x @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def minimind3_state(seed=0, dtype=torch.float16, vocab=VOCAB) -> dict:
    """Random weights under minimind-3 model_minimind.py's names, per-head q/k norm weights away from 1;
    lm_head.weight is the embedding (tied)."""
    w = weight_drawer(seed, dtype)
    head_dim = DIM // HEADS
    sd = {"model.embed_tokens.weight": w(vocab, DIM, std=1.0), "model.norm.weight": 1 + w(DIM, std=0.1)}
    for i in range(LAYERS):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        sd.update({p + "input_layernorm.weight": 1 + w(DIM, std=0.1),
                   p + "post_attention_layernorm.weight": 1 + w(DIM, std=0.1),
                   a + "q_proj.weight": w(HEADS * head_dim, DIM), a + "k_proj.weight": w(KV_HEADS * head_dim, DIM),
                   a + "v_proj.weight": w(KV_HEADS * head_dim, DIM), a + "o_proj.weight": w(DIM, HEADS * head_dim),
                   a + "q_norm.weight": 1 + w(head_dim, std=0.3), a + "k_norm.weight": 1 + w(head_dim, std=0.3),
                   m + "gate_proj.weight": w(HIDDEN, DIM), m + "up_proj.weight": w(HIDDEN, DIM),
                   m + "down_proj.weight": w(DIM, HIDDEN)})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return sd


def minimind3_logits(sd: dict, ids):
    """minimind-3's forward written out: each head's q and k RMS-normalised, then a half-split RoPE
    (dim i turns with dim i + head_dim/2), GQA by repetition."""
    sd = {k: v.float() for k, v in sd.items()}
    B, L = ids.shape
    head_dim = DIM // HEADS
    freqs = 1.0 / THETA ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(L).float(), freqs).repeat(1, 2)[None, :, None, :]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS3))

    def rope(x):   # (B, L, H, D)
        first, second = x.chunk(2, dim=-1)
        return x * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()

    h = sd["model.embed_tokens.weight"][ids]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for i in range(LAYERS):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        x = rms(h, sd[f"model.layers.{i}.input_layernorm.weight"])
        q = rope(rms((x @ sd[a + "q_proj.weight"].T).view(B, L, HEADS, head_dim), sd[a + "q_norm.weight"]))
        k = rope(rms((x @ sd[a + "k_proj.weight"].T).view(B, L, KV_HEADS, head_dim), sd[a + "k_norm.weight"]))
        v = (x @ sd[a + "v_proj.weight"].T).view(B, L, KV_HEADS, head_dim)
        k, v = (t.repeat_interleave(HEADS // KV_HEADS, dim=2) for t in (k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + causal
        h = h + torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, L, DIM) @ sd[a + "o_proj.weight"].T
        x = rms(h, sd[f"model.layers.{i}.post_attention_layernorm.weight"])
        h = h + (F.silu(x @ sd[m + "gate_proj.weight"].T) * (x @ sd[m + "up_proj.weight"].T)) \
            @ sd[m + "down_proj.weight"].T
    return rms(h, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def our_logits(lm, ids):
    with torch.no_grad():
        return lm(lm.embed_tokens(ids))


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def run_convert(capsys, pth, out, *flags):
    """scripts/convert_minimind.py's main in-process → (exit code, stderr)."""
    from convert_minimind import main
    try:
        main([f"--lm={pth}", f"--out={out}", f"--num_heads={HEADS}", *flags])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


# ---------------------------------------------------------------- MiniMind → ours

def test_minimind_pth_converts_to_identical_logits(tmp_path, capsys):
    sd = minimind_state()
    torch.save(sd, tmp_path / "lm_32.pth")
    code, err = run_convert(capsys, tmp_path / "lm_32.pth", tmp_path / "lm_32.safetensors")
    assert code == 0, err
    cfg, state = read_lm(tmp_path / "lm_32.safetensors")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.rope_theta) == (DIM, LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB, THETA)
    diff = (our_logits(build_lm(cfg, state), IDS) - minimind_logits(sd, IDS)).abs().max().item()
    print(f"MiniMind → ours: max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4
    with pytest.raises(CheckpointError, match="--from_lm"):   # an LM file is not a whole checkpoint
        load_checkpoint(tmp_path / "lm_32.safetensors")


def test_without_the_rope_permutation_the_logits_differ():
    """The reference is sensitive to the RoPE layout, so the match above is not a coincidence."""
    sd = minimind_state()
    renamed = rename_in({k: v.float() for k, v in sd.items() if k != "output.weight"}, MINIMIND_NAMES, "test")
    cfg = infer_config(renamed, MINIMIND_NAMES, "test", HEADS, rope_theta=THETA, norm_eps=EPS)
    diff = (our_logits(build_lm(cfg, renamed), IDS) - minimind_logits(sd, IDS)).abs().max().item()
    assert diff > 0.1


def test_hf_named_minimind_pth_is_renamed_and_matches_transformers(tmp_path):
    """model_minimind.py's names are Llama's and its RoPE is half-split already: no permutation."""
    hf = random_llama()
    with torch.no_grad():   # MiniMind saves fp16: round the reference's weights the same way
        for p in hf.parameters():
            p.copy_(p.half().float())
        expected = hf(IDS).logits
    torch.save({k: v.half() for k, v in hf.state_dict().items()}, tmp_path / "lm.pth")
    cfg, state = read_lm(tmp_path / "lm.pth", num_heads=HEADS, rope_theta=THETA)
    assert (our_logits(build_lm(cfg, state), IDS) - expected).abs().max().item() < 1e-4


def test_minimind3_pth_converts_with_its_q_k_norms_to_identical_logits(tmp_path, capsys):
    """llm_768.pth's layout: the head count is read off q_norm's size and ε is minimind-3's, so no flag is needed."""
    from convert_minimind import main
    sd = minimind3_state()
    torch.save(sd, tmp_path / "llm_32.pth")
    main([f"--lm={tmp_path / 'llm_32.pth'}", f"--out={tmp_path / 'llm_32.safetensors'}"])
    assert "minimind-3" in capsys.readouterr().out
    cfg, state = read_lm(tmp_path / "llm_32.safetensors")
    assert (cfg.qk_norm, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps, cfg.rope_theta) == \
        (True, HEADS, KV_HEADS, EPS3, THETA)
    expected = minimind3_logits(sd, IDS)
    diff = (our_logits(build_lm(cfg, state), IDS) - expected).abs().max().item()
    print(f"minimind-3 → ours: max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4
    # The reference is sensitive to the q/k norms: the same LM without them is far off.
    plain = {k: v for k, v in state.items() if not k.endswith(("attn.q_norm.weight", "attn.k_norm.weight"))}
    assert (our_logits(build_lm(replace(cfg, qk_norm=False), plain), IDS) - expected).abs().max().item() > 0.1


def with_experts(sd: dict, mlp: str, parts: dict, experts=2) -> dict:
    """Layer 0's dense MLP swapped for a router and experts, as MiniMind's MoE LMs store it."""
    sd = {k: v for k, v in sd.items() if not k.startswith(mlp)}
    sd[mlp + "gate.weight"] = torch.zeros(experts, DIM, dtype=torch.float16)
    for e in range(experts):
        sd.update({f"{mlp}experts.{e}.{name}.weight": torch.zeros(shape, dtype=torch.float16)
                   for name, shape in parts.items()})
    return sd


@pytest.mark.parametrize("moe", [
    lambda: with_experts(minimind_state(), "layers.0.feed_forward.",
                         {"w1": (HIDDEN, DIM), "w2": (DIM, HIDDEN), "w3": (HIDDEN, DIM)}),
    lambda: with_experts(minimind3_state(), "model.layers.0.mlp.",
                         {"gate_proj": (HIDDEN, DIM), "up_proj": (HIDDEN, DIM), "down_proj": (DIM, HIDDEN)}),
], ids=["MiniMind2-MoE", "minimind-3-moe"])
def test_a_mixture_of_experts_lm_stops_with_one_line(tmp_path, capsys, moe):
    torch.save(moe(), tmp_path / "moe.pth")
    code, err = run_convert(capsys, tmp_path / "moe.pth", tmp_path / "lm.safetensors")
    assert code == 1 and err.count("\n") == 1 and "mixture-of-experts" in err and "experts.0." in err, err
    assert not (tmp_path / "lm.safetensors").exists()


def test_num_heads_that_contradict_the_q_norm_size_are_named(tmp_path, capsys):
    torch.save(minimind3_state(), tmp_path / "llm.pth")
    code, err = run_convert(capsys, tmp_path / "llm.pth", tmp_path / "lm.safetensors", f"--num_heads={HEADS // 2}")
    assert code == 1 and f"num_heads {HEADS // 2}" in err and "q_norm" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("layers.1.attention.wv.weight"), ["missing", "layers.1.attention.wv.weight"]),
    (lambda sd: sd.update({"layers.1.feed_forward.w1.weight": torch.zeros(HIDDEN - 8, DIM)}),
     ["wrong shape", "layers.1.feed_forward.w1.weight"]),
    (lambda sd: sd.update({"layers.0.attention.q_norm.weight": torch.ones(8)}),
     ["unexpected", "layers.0.attention.q_norm.weight"]),
    (lambda sd: sd.update({"output.weight": sd["output.weight"] + 1}), ["output.weight", "untied"]),
])
def test_a_mismatch_stops_with_one_line_naming_the_key(tmp_path, capsys, change, words):
    sd = dict(minimind_state())
    change(sd)
    torch.save(sd, tmp_path / "lm.pth")
    code, err = run_convert(capsys, tmp_path / "lm.pth", tmp_path / "lm.safetensors")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ")
    assert all(w in err for w in words), err
    assert not (tmp_path / "lm.safetensors").exists()


def test_num_heads_that_cannot_fit_the_shapes_is_named(tmp_path, capsys):
    torch.save(minimind_state(), tmp_path / "lm.pth")
    code, err = run_convert(capsys, tmp_path / "lm.pth", tmp_path / "lm.safetensors", "--num_heads=3")
    assert code == 1 and "num_heads 3" in err


class WritesAMarker:
    """Unpickling this calls open(path, "w"): code running at load time would leave the file behind."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_pth_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    sd = dict(minimind_state(), payload=WritesAMarker(marker))
    torch.save(sd, tmp_path / "evil.pth")
    assert not marker.exists()
    code, err = run_convert(capsys, tmp_path / "evil.pth", tmp_path / "lm.safetensors")
    assert code == 1 and "refused" in err and "evil.pth" in err
    assert not marker.exists()


# ---------------------------------------------------------------- Hugging Face ↔ ours

def random_llama(seed=0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    settings = dict(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, vocab_size=VOCAB, rope_theta=THETA, rms_norm_eps=EPS,
                    tie_word_embeddings=True, max_position_embeddings=128)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()
    with torch.no_grad():   # large weights: distinct, confident predictions
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("overrides, words", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
    (dict(tie_word_embeddings=False), "untied"),
])
def test_llama_configs_we_cannot_represent_are_refused_by_name(tmp_path, overrides, words):
    random_llama(**overrides).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConversionError, match=words) as err:
        read_hf_folder(tmp_path / "llama")
    assert "\n" not in str(err.value)


def test_another_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ConversionError, match="qwen2"):
        read_lm(tmp_path)


def random_qwen3(seed=0, **overrides):
    """A transformers Qwen3ForCausalLM (the family minimind-3 follows): per-head q/k RMSNorm before RoPE."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    settings = dict(hidden_size=DIM, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    num_key_value_heads=KV_HEADS, head_dim=DIM // HEADS, vocab_size=VOCAB, rope_theta=THETA,
                    rms_norm_eps=EPS3, tie_word_embeddings=True, max_position_embeddings=128, use_sliding_window=False)
    model = Qwen3ForCausalLM(Qwen3Config(**{**settings, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim >= 2 else 1 + 0.3 * torch.randn_like(p))   # norms away from 1
    return model


@pytest.mark.parametrize("make, qk_norm, eps", [(random_llama, False, EPS), (random_qwen3, True, EPS3)])
def test_a_saved_hf_folder_loads_into_ours_with_the_same_logits(tmp_path, make, qk_norm, eps):
    hf = make()
    hf.save_pretrained(tmp_path / "hf")
    cfg, state = read_hf_folder(tmp_path / "hf")
    with torch.no_grad():
        expected = hf(IDS).logits
    diff = (our_logits(build_lm(cfg, state), IDS) - expected).abs().max().item()
    print(f"HF {type(hf).__name__} → ours: max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4 and cfg.max_seq_len == 128 and cfg.qk_norm == qk_norm and cfg.norm_eps == eps


@pytest.mark.parametrize("overrides, words", [
    (dict(use_sliding_window=True, sliding_window=16), "sliding"),
    (dict(head_dim=2 * DIM // HEADS), "head_dim"),
    (dict(tie_word_embeddings=False), "untied"),
])
def test_qwen3_configs_we_cannot_represent_are_refused_by_name(tmp_path, overrides, words):
    random_qwen3(**overrides).save_pretrained(tmp_path / "qwen3")
    with pytest.raises(ConversionError, match=words) as err:
        read_hf_folder(tmp_path / "qwen3")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def exported(request, tmp_path_factory, tokenizer_dir, tokenizer, vocab_size):
    """A tiny VLM checkpoint with lively LM weights (with per-head q/k norms for qwen3), and its export as a
    transformers folder."""
    from conftest import tiny_vlm
    from export_hf import export
    from model.checkpoint import save_checkpoint
    tmp = tmp_path_factory.mktemp("export")
    vision_pad = tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    model = tiny_vlm(vocab_size=vocab_size, vision_token_id=vision_pad, qk_norm=request.param == "qwen3")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.lm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 if p.ndim >= 2 else 1 + 0.3 * torch.randn_like(p))   # norms away from 1
    ckpt = tmp / "sft_video_32.safetensors"
    save_checkpoint(model, ckpt, stage="video", step=0, tokenizer=str(tokenizer_dir))
    folder = export(str(ckpt), tmp / "hf", out_dir=tmp)
    assert json.loads((folder / "config.json").read_text())["model_type"] == request.param
    return model.eval(), ckpt, folder


PROMPTS = ["Hello", "What happens in the video?", "Describe a red circle.", "Count to three.",
           "Which way does the blue square move?"]


def test_export_loads_in_transformers_with_identical_greedy_tokens_and_logits(exported, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model.chat import ChatEncoder
    model, _, folder = exported
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    chat = ChatEncoder(tokenizer, model.vision_cfg.num_visual_tokens)
    assert hf.config.tie_word_embeddings and hf.config.vocab_size == model.lm_cfg.vocab_size
    same, worst = 0, 0.0
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids, _, _ = chat.encode(messages, add_generation_prompt=True)
        # The exported chat template spells the same prompt our encoder builds.
        assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tokenizer.decode(ids)
        x = torch.tensor([ids])
        ours = torch.stack(list(model.generate(x, max_new_tokens=32)), 1)[0].tolist()
        with torch.no_grad():
            theirs = hf.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                 pad_token_id=chat.pad_id)[0, len(ids):].tolist()
            worst = max(worst, (hf(x).logits - model(x)).abs().max().item())
        assert len(ours) == len(theirs) == 32
        same += ours == theirs
    print(f"ours → HF: {same}/{len(PROMPTS)} prompts × 32 greedy tokens identical, max |Δlogits| = {worst:.3g}")
    assert same == len(PROMPTS) and worst < 1e-4


def test_export_reads_back_into_ours_exactly(exported):
    model, _, folder = exported
    cfg, state = read_hf_folder(folder)
    assert cfg == model.lm_cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(our_logits(build_lm(cfg, state), ids), our_logits(model.lm, ids))


def test_eval_text_only_greedy_answer_matches_transformers(exported, tokenizer_dir, tokenizer):
    from transformers import AutoModelForCausalLM
    from model.chat import ChatEncoder
    model, ckpt, folder = exported
    prompt = "Describe a red circle."
    result = run_python("eval.py", f"--weight={ckpt}", f"--tokenizer={tokenizer_dir}", f"--prompt={prompt}",
                        "--temperature=0", "--max_new_tokens=16", "--device=cpu")
    assert result.returncode == 0, result.stderr
    chat = ChatEncoder(tokenizer, model.vision_cfg.num_visual_tokens)
    ids, _, _ = chat.encode([{"role": "user", "content": prompt}], add_generation_prompt=True)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=chat.im_end,
                          pad_token_id=chat.pad_id)[0, len(ids):]
    expected = tokenizer.decode(out, skip_special_tokens=True).strip()
    assert expected and result.stdout.strip() == expected


def test_a_vlm_checkpoint_gives_its_lm_part(exported):
    model, ckpt, _ = exported
    cfg, state = read_ours(ckpt)
    assert cfg == model.lm_cfg
    assert torch.equal(state["embed_tokens.weight"], model.lm.embed_tokens.weight)
