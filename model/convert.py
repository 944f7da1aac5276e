"""Language-model weights in and out of model/lm.py's layout: MiniMind .pth files, Hugging Face Llama and Qwen3
folders, our own files."""
import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.atomic import write_safetensors
from model.chat import chat_format
from model.config import LMConfig, config_from_dict, config_to_dict
from model.lm import LanguageModel
from model.weights_io import CheckpointError, few, load_torch_state_dict, misfit, read_safetensors_metadata

# Our key → theirs; "{n}" is the layer index. lm_head.weight is tied to embed_tokens.weight in our LM.
HF_NAMES = {   # transformers LlamaForCausalLM / Qwen3ForCausalLM, and MiniMind's later model_minimind.py (same names)
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{n}.input_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "layers.{n}.attn.q_proj.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "layers.{n}.attn.k_proj.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "layers.{n}.attn.v_proj.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "layers.{n}.attn.o_proj.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "layers.{n}.attn.q_norm.weight": "model.layers.{n}.self_attn.q_norm.weight",   # qk_norm LMs only
    "layers.{n}.attn.k_norm.weight": "model.layers.{n}.self_attn.k_norm.weight",
    "layers.{n}.post_attn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
    "layers.{n}.mlp.gate_proj.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "layers.{n}.mlp.up_proj.weight": "model.layers.{n}.mlp.up_proj.weight",
    "layers.{n}.mlp.down_proj.weight": "model.layers.{n}.mlp.down_proj.weight",
}
MINIMIND_NAMES = {   # MiniMind2's model/model.py (the generation lm_512.pth was trained with)
    "embed_tokens.weight": "tok_embeddings.weight",
    "norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "layers.{n}.input_norm.weight": "layers.{n}.attention_norm.weight",
    "layers.{n}.attn.q_proj.weight": "layers.{n}.attention.wq.weight",
    "layers.{n}.attn.k_proj.weight": "layers.{n}.attention.wk.weight",
    "layers.{n}.attn.v_proj.weight": "layers.{n}.attention.wv.weight",
    "layers.{n}.attn.o_proj.weight": "layers.{n}.attention.wo.weight",
    "layers.{n}.post_attn_norm.weight": "layers.{n}.ffn_norm.weight",
    "layers.{n}.mlp.gate_proj.weight": "layers.{n}.feed_forward.w1.weight",
    "layers.{n}.mlp.up_proj.weight": "layers.{n}.feed_forward.w3.weight",
    "layers.{n}.mlp.down_proj.weight": "layers.{n}.feed_forward.w2.weight",
}
TIED = "lm_head.weight"
# Buffers some writers saved beside the weights; they are recomputed, never learned.
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(attention\.mask|rotary_emb\.inv_freq)$")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DDP / torch.compile wrappers
# Mixture-of-experts feed-forward layers (MiniMind2-MoE, minimind-3-moe): a router and experts instead of one MLP.
MOE_KEYS = re.compile(r"\.(mlp|feed_forward)\.(gate|experts|shared_experts)\.")
# What a MiniMind .pth cannot tell, per generation (their model code's defaults): MiniMind2 (model.py, and
# model_minimind.py until 2026-03) and minimind-3 (per-head q/k norm, 768 wide, 8 heads, 4 KV heads).
MINIMIND_DEFAULTS = {"MiniMind2": dict(num_heads=8, rope_theta=1e6, norm_eps=1e-5),
                     "minimind-3": dict(num_heads=None, rope_theta=1e6, norm_eps=1e-6)}   # heads: from q_norm's size


class ConversionError(Exception):
    """Weights that cannot become our LM; the message names the file and the offending keys or fields."""


# ---------------------------------------------------------------- renaming

def _pattern(template: str):
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(\d+)") + "$")


def _rename(state: dict, pairs) -> tuple:
    """Rename keys by (source template, target template) pairs → (renamed state, keys no pair matched)."""
    patterns = [(_pattern(source), target) for source, target in pairs]
    out, unmatched = {}, []
    for key, tensor in state.items():
        for pattern, target in patterns:
            m = pattern.match(key)
            if m:
                out[target.format(n=m.group(1)) if m.groups() else target] = tensor
                break
        else:
            unmatched.append(key)
    return out, unmatched


def rename_in(state: dict, names: dict, path) -> dict:
    """Their keys → ours; any key the map does not know is an error naming it."""
    out, unexpected = _rename(state, [(theirs, ours) for ours, theirs in names.items()])
    if unexpected:
        raise ConversionError(f"{path}: unexpected keys (parts our LM does not have): {few(unexpected)}")
    return out


def rename_out(state: dict, names: dict) -> dict:
    """Our keys → theirs."""
    out, unmatched = _rename(state, names.items())
    if unmatched:
        raise KeyError(f"no export name for {unmatched[0]}")
    return out


def _theirs(key: str, names: dict) -> str:
    """Our key spelt in the source's names, for error messages."""
    for ours, theirs in names.items():
        m = _pattern(ours).match(key)
        if m:
            return theirs.format(n=m.group(1)) if m.groups() else theirs
    return key


# ---------------------------------------------------------------- checks shared by every source

def untie(state: dict, names: dict, path) -> dict:
    """Drop lm_head.weight after checking it equals embed_tokens.weight: our LM ties the two."""
    head = state.pop(TIED, None)
    embed = state.get("embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ConversionError(f"{path}: {_theirs(TIED, names)} differs from {_theirs('embed_tokens.weight', names)}; "
                              "our LM ties the output head to the embedding (untied heads are not supported)")
    return state


def expected_shapes(cfg: LMConfig) -> dict:
    with torch.device("meta"):
        lm = LanguageModel(cfg)
    return {k: tuple(v.shape) for k, v in lm.state_dict().items() if k != TIED}


def check_fits(cfg: LMConfig, state: dict, names: dict, path):
    """Missing, unexpected and wrong-shaped keys, all named in the source's spelling."""
    problems = misfit(expected_shapes(cfg), state, spell=lambda k: _theirs(k, names))
    if problems:
        raise ConversionError(f"{path}: does not fit a {cfg.num_layers}-layer {cfg.hidden_size}-wide LM — {problems}")


def heads_from_qk_norm(state: dict, names: dict, path, num_heads, dim: int):
    """The head count of an LM with per-head q/k norms: their size is head_dim, so it is read off the shapes
    (a num_heads given must agree); num_heads unchanged for an LM without them."""
    norm = next((v for k, v in state.items() if k.endswith("attn.q_norm.weight")), None)
    if norm is None:
        return num_heads
    name, size = _theirs("layers.0.attn.q_norm.weight", names), norm.shape[0] if norm.ndim == 1 else 0
    if not size or dim % size:
        raise ConversionError(f"{path}: {name} has shape {tuple(norm.shape)}, "
                              f"not a head_dim dividing hidden size {dim}")
    if num_heads not in (None, dim // size):
        raise ConversionError(f"{path}: num_heads {num_heads} given, but {name} has size {size}, "
                              f"so head_dim is {size} and there are {dim // size} heads")
    return dim // size


def infer_config(state: dict, names: dict, path, num_heads=None, **fixed) -> LMConfig:
    """Sizes from the tensor shapes; num_heads cannot be read off them (unless the LM has q/k norms) and is given."""
    needed = ["embed_tokens.weight", "layers.0.attn.k_proj.weight", "layers.0.mlp.gate_proj.weight"]
    missing = [_theirs(k, names) for k in needed if k not in state]
    if missing:
        raise ConversionError(f"{path}: missing {', '.join(missing)}")
    vocab, dim = state["embed_tokens.weight"].shape
    num_heads = heads_from_qk_norm(state, names, path, num_heads, dim)
    if not num_heads:
        raise ConversionError(f"{path}: the head count cannot be read off the shapes; pass num_heads")
    if dim % num_heads:
        raise ConversionError(f"{path}: hidden size {dim} is not a multiple of num_heads {num_heads}")
    head_dim = dim // num_heads

    def usual_rows(suffix):   # the most common size over layers, so one odd layer is the one blamed
        rows = [v.shape[0] for k, v in state.items() if re.fullmatch(r"layers\.\d+\." + re.escape(suffix), k)]
        return Counter(rows).most_common(1)[0][0]
    kv_rows = usual_rows("attn.k_proj.weight")
    if kv_rows % head_dim:
        raise ConversionError(f"{path}: {_theirs('layers.0.attn.k_proj.weight', names)} has {kv_rows} rows, "
                              f"not a multiple of head_dim {head_dim} (is num_heads {num_heads} right?)")
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
    qk_norm = any(k.endswith(("attn.q_norm.weight", "attn.k_norm.weight")) for k in state)
    return LMConfig(vocab_size=vocab, hidden_size=dim, num_layers=layers, num_heads=num_heads,
                    num_kv_heads=kv_rows // head_dim, intermediate_size=usual_rows("mlp.gate_proj.weight"),
                    qk_norm=qk_norm, **fixed)


def interleaved_to_half_split(weight, head_dim: int):
    """Reorder each head's output rows: RoPE pair (2i, 2i+1) becomes pair (i, i + head_dim/2).

    MiniMind's complex RoPE rotates adjacent dims; ours (and HF's) rotates dim i with dim
    i + head_dim/2. Permuting q and k rows the same way leaves every q·k, hence the logits, unchanged.
    """
    order = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    heads = weight.shape[0] // head_dim
    return weight.view(heads, head_dim, -1)[:, order].reshape(weight.shape)


# ---------------------------------------------------------------- sources

def read_torch_file(path) -> dict:
    """A .pth/.bin state dict of plain tensors; pickled code is refused without running it."""
    try:
        state = load_torch_state_dict(path, WRAPPER_PREFIXES)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return {k: v.float() for k, v in state.items() if not RECOMPUTED_BUFFERS.search(k)}


def minimind_layout(state: dict, path):
    """(names, interleaved RoPE?) from the key names: model.py (lm_512.pth) or model_minimind.py."""
    if "tok_embeddings.weight" in state or any(".attention.wq." in k for k in state):
        return MINIMIND_NAMES, True
    if "model.embed_tokens.weight" in state or any(".self_attn.q_proj." in k for k in state):
        return HF_NAMES, False
    raise ConversionError(f"{path}: neither MiniMind key layout (tok_embeddings/layers.N.attention.wq or "
                          f"model.embed_tokens/model.layers.N.self_attn.q_proj); keys start: {few(state, 4)}")


def minimind_generation(state: dict, path) -> str:
    """"minimind-3" (per-head q/k norms) or "MiniMind2", from the key names; MoE LMs are refused."""
    experts = [k for k in state if MOE_KEYS.search(k)]
    if experts:
        raise ConversionError(f"{path}: a mixture-of-experts (MoE) LM ({few(experts, 2)}); only dense MiniMind "
                              "LMs load (e.g. lm_512.pth, llm_768.pth)")
    return "minimind-3" if any(k.endswith(("q_norm.weight", "k_norm.weight")) for k in state) else "MiniMind2"


def read_minimind(path, num_heads=None, rope_theta=None, norm_eps=None):
    """(LMConfig, our state dict) from a MiniMind LM .pth; a setting left None takes its generation's value.

    MiniMind2's model.py names (tok_embeddings, layers.N.attention.wq, ...) come with its interleaved
    complex RoPE, so q/k rows are permuted; the later HF-style names (model.layers.N.self_attn.q_proj)
    come with a half-split RoPE like ours and are only renamed (minimind-3's q/k norms too).
    """
    raw = read_torch_file(path)
    generation = minimind_generation(raw, path)
    names, interleaved = minimind_layout(raw, path)
    state = untie(rename_in(raw, names, path), names, path)
    given = dict(num_heads=num_heads, rope_theta=rope_theta, norm_eps=norm_eps)
    settings = {**MINIMIND_DEFAULTS[generation], **{k: v for k, v in given.items() if v is not None}}
    cfg = infer_config(state, names, path, **settings)
    check_fits(cfg, state, names, path)
    if interleaved:
        head_dim = cfg.hidden_size // cfg.num_heads
        for key in list(state):
            if key.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
                state[key] = interleaved_to_half_split(state[key], head_dim)
    return cfg, state


# model_type → (transformers class, whether it has per-head q/k norms): the decoders our LM can be.
HF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", False), "qwen3": ("Qwen3ForCausalLM", True)}


def read_hf_config(folder):
    """(the raw config dict, our LMConfig) from a Llama or Qwen3 config.json; what we cannot represent is refused
    by name."""
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{folder}: no config.json (not a Hugging Face model folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if hf.get("model_type") not in HF_ARCHITECTURES:
        raise ConversionError(f"{path}: model_type {hf.get('model_type')!r}; only Llama (LlamaForCausalLM) and "
                              "Qwen3 (Qwen3ForCausalLM) folders load")
    rope = hf.get("rope_parameters") or {}
    refusals = [(hf.get("attention_bias", False), "attention_bias is true (our attention has no biases)"),
                (hf.get("mlp_bias", False), "mlp_bias is true (our MLP has no biases)"),
                (hf.get("rope_scaling"), f"rope_scaling {hf.get('rope_scaling')} (only plain RoPE)"),
                (rope.get("rope_type", "default") != "default", f"rope_type {rope.get('rope_type')!r} (only plain RoPE)"),
                (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r} (only silu)"),
                (hf.get("use_sliding_window", False), "use_sliding_window is true (only full attention)")]
    for refused, why in refusals:
        if refused:
            raise ConversionError(f"{path}: {why}")
    try:
        heads = hf["num_attention_heads"]
        dim = hf["hidden_size"]
        if hf.get("head_dim") not in (None, dim // heads):
            raise ConversionError(f"{path}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        return hf, LMConfig(vocab_size=hf["vocab_size"], hidden_size=dim, num_layers=hf["num_hidden_layers"],
                        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
                        intermediate_size=hf["intermediate_size"],
                        max_seq_len=hf.get("max_position_embeddings", LMConfig.max_seq_len),
                        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                        qk_norm=HF_ARCHITECTURES[hf["model_type"]][1])
    except KeyError as e:
        raise ConversionError(f"{path}: no {e.args[0]} field") from None


def read_hf_weights(folder) -> dict:
    """HF weights from model.safetensors, its sharded index, or pytorch_model.bin (tensors only)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "pytorch_model.bin").is_file():
        return read_torch_file(folder / "pytorch_model.bin")
    else:
        raise ConversionError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise ConversionError(f"{f}: not a readable safetensors file ({e})") from None
    return {k: v.float() for k, v in state.items() if not RECOMPUTED_BUFFERS.search(k)}


def read_hf_folder(folder):
    """(LMConfig, our state dict) from a Hugging Face Llama or Qwen3 folder (config.json is read, never code)."""
    hf, cfg = read_hf_config(folder)
    state = rename_in(read_hf_weights(folder), HF_NAMES, folder)
    if not hf.get("tie_word_embeddings", False) and TIED not in state:   # Llama's and Qwen3's default is untied
        raise ConversionError(f"{folder}: tie_word_embeddings is false but there is no lm_head.weight")
    state = untie(state, HF_NAMES, folder)
    check_fits(cfg, state, HF_NAMES, folder)
    return cfg, state


def read_ours(path):
    """(LMConfig, state) from one of our files: an LM file (convert_minimind.py) or a VLM checkpoint's LM part."""
    try:
        meta = read_safetensors_metadata(path)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    if "lm_config" not in meta:
        raise ConversionError(f"{path}: no lm_config in its metadata, so not one of our files "
                              "(pass a Hugging Face model as its folder)")
    cfg = config_from_dict(LMConfig, json.loads(meta["lm_config"]))
    state = load_file(str(path))
    if "vision_config" in meta:   # a whole video LLM: keep the language model
        state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    check_fits(cfg, state, {}, path)
    return cfg, state


def read_lm(path, num_heads=None, rope_theta=None, norm_eps=None):
    """(LMConfig, state) from any supported source: a HF folder, our .safetensors, or a MiniMind .pth.

    num_heads / rope_theta / norm_eps apply to MiniMind files only (None: the generation's value; the
    others record them).
    """
    p = Path(path)
    if p.is_dir():
        return read_hf_folder(p)
    if not p.is_file():
        raise ConversionError(f"{path}: no such file or folder")
    if p.suffix == ".safetensors":
        return read_ours(p)
    return read_minimind(p, num_heads, rope_theta, norm_eps)


# ---------------------------------------------------------------- into our model, and out

def load_into(lm: LanguageModel, state: dict, path=""):
    """Copy a converted state into an LM strictly (the tied head follows the embedding)."""
    check_fits(lm.cfg, state, {}, path)
    with torch.no_grad():
        for key, target in lm.state_dict().items():
            if key != TIED:
                target.copy_(state[key])
    return lm


def grow_vocab(cfg: LMConfig, state: dict, vocab_size: int):
    """Append embedding rows (for tokens a tokenizer gained); they start at the mean embedding."""
    embed = state["embed_tokens.weight"]
    extra = vocab_size - embed.shape[0]
    if extra < 0:
        raise ConversionError(f"cannot shrink the vocabulary from {embed.shape[0]} to {vocab_size}")
    rows = embed.mean(0, keepdim=True).expand(extra, -1)
    grown = dict(state, **{"embed_tokens.weight": torch.cat([embed, rows])})
    return LMConfig(**{**config_to_dict(cfg), "vocab_size": vocab_size}), grown


def save_lm(cfg: LMConfig, state: dict, path, **info):
    """Our LM-only file: safetensors with the LMConfig in its metadata (no vision_config)."""
    check_fits(cfg, state, {}, path)
    tensors = {k: v.detach().float().contiguous() for k, v in state.items()}
    meta = {"lm_config": json.dumps(config_to_dict(cfg)), "kind": "lm", **{k: str(v) for k, v in info.items()}}
    write_safetensors(path, tensors, meta)


def hf_architecture(cfg: LMConfig) -> str:
    """The transformers class our LM is written as: Qwen3ForCausalLM with per-head q/k norms, else LlamaForCausalLM."""
    return next(name for name, qk_norm in HF_ARCHITECTURES.values() if qk_norm == cfg.qk_norm)


def hf_config(cfg: LMConfig, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """config.json for transformers' LlamaForCausalLM, or Qwen3ForCausalLM when the LM has q/k norms; rope_theta
    is written both the v4 and the v5 way."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.hidden_size // cfg.num_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id,
    }
    if cfg.qk_norm:   # Qwen3: Llama's fields less the MLP bias and tensor-parallel ones, full attention in every layer
        for key in ("mlp_bias", "pretraining_tp"):
            config.pop(key)
        config.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                       "sliding_window": None, "max_window_layers": cfg.num_layers})
    return config


def save_hf_folder(cfg: LMConfig, state: dict, tokenizer, out_dir):
    """A LlamaForCausalLM (or Qwen3ForCausalLM) folder: config.json, generation_config.json, model.safetensors,
    tokenizer files with a chat template in the tokenizer's own chat format (model.chat.chat_format)."""
    check_fits(cfg, state, {}, out_dir)
    if len(tokenizer) > cfg.vocab_size:
        raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but the LM only {cfg.vocab_size} rows")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = chat_format(tokenizer)
    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in (fmt.turn_start, fmt.turn_end, fmt.pad))
    tensors = {k: v.detach().float().contiguous() for k, v in rename_out(state, HF_NAMES).items()}
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, bos, eos, pad), indent=2) + "\n")
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tokenizer.chat_template = fmt.template   # spells exactly what ChatEncoder builds, so HF tools prompt alike
    tokenizer.save_pretrained(str(out))
    return out
