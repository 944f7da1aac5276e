"""Starting the video LLM's LM from outside weights (--from_lm) with a MiniMind-style tokenizer that has no slot token;
which chat formats a tokenizer may have."""
import pytest
import torch

from conftest import CLIP_MODEL, CLIP_SIZE, TINY_ARCH
from model.chat import CHATML, MINIMIND2, VISION_PAD, TokenizerError, chat_format, load_tokenizer
from model.config import LMConfig
from model.convert import MINIMIND_NAMES, grow_vocab, read_minimind, rename_out
from model.lm import LanguageModel


def minimind_like_tokenizer(out_dir, synthetic, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                            chat_template=None):
    """A byte-level BPE folder with only these special tokens (default: MiniMind2's 2025-04 ChatML ones, no
    <|vision_pad|>): the pad token first, then turn start and turn end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from model.tokenizer import iter_texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(iter_texts([synthetic / "pretrain.jsonl"]), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[1], eos_token=specials[2],
                                 pad_token=specials[0], unk_token=specials[0], chat_template=chat_template)
    hf.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def minimind_tokenizer(tmp_path_factory, synthetic):
    return minimind_like_tokenizer(tmp_path_factory.mktemp("mm_tokenizer"), synthetic)


def test_a_tokenizer_without_the_slot_token_gets_it_appended_at_the_end(minimind_tokenizer):
    from transformers import AutoTokenizer
    plain = AutoTokenizer.from_pretrained(str(minimind_tokenizer))
    tok = load_tokenizer(minimind_tokenizer)
    assert len(tok) == len(plain) + 1 and tok.convert_tokens_to_ids(VISION_PAD) == len(plain)
    assert tok("a<|vision_pad|>b", add_special_tokens=False)["input_ids"][1] == len(plain)


def test_the_chat_format_comes_from_the_tokenizers_special_tokens(tmp_path, synthetic, minimind_tokenizer):
    assert chat_format(load_tokenizer(minimind_tokenizer)) == CHATML
    folder = minimind_like_tokenizer(tmp_path / "s", synthetic, specials=("<unk>", "<s>", "</s>"))
    assert chat_format(load_tokenizer(folder)) == MINIMIND2   # MiniMind2's first tokenizer (2025-02)


@pytest.mark.parametrize("specials, words", [
    (("<pad>", "<bos>", "<eos>"), ["ChatML needs", "<|im_start|>", "MiniMind2 needs", "<unk>", "<s>", "</s>"]),
    (("<bos>", "<|im_start|>", "<|im_end|>"), ["ChatML", "pad token <|endoftext|>"]),
])
def test_a_tokenizer_in_no_chat_format_we_know_is_one_line_naming_what_it_lacks(tmp_path, synthetic, specials, words):
    folder = minimind_like_tokenizer(tmp_path / "odd", synthetic, specials=specials)
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert all(w in str(err.value) for w in words), err.value


def save_minimind_pth(path, vocab_size, seed=0):
    """Random LM weights written under MiniMind2 model.py's key names (as lm_512.pth is)."""
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=vocab_size, hidden_size=TINY_ARCH["hidden_size"], num_layers=TINY_ARCH["num_layers"],
                   num_heads=TINY_ARCH["num_heads"], num_kv_heads=TINY_ARCH["num_kv_heads"], intermediate_size=64)
    state = rename_out(LanguageModel(cfg).state_dict(), MINIMIND_NAMES)
    torch.save({k: v.half() for k, v in state.items()}, path)
    return path


VISION_FLAGS = [f"--clip_model={CLIP_MODEL}", f"--clip_image_size={CLIP_SIZE}",
                *(f"--{k}={TINY_ARCH[k]}" for k in ("num_frames", "num_visual_tokens", "summary_dim", "summary_layers"))]
RUN_FLAGS = ["--batch_size=4", "--max_steps=2", "--no_progress", "--val_every=0", "--num_workers=0", "--seed=0"]


def test_pretrain_from_a_minimind_pth_grows_the_vocab_and_keeps_the_lm(tmp_path, synthetic, vision_file,
                                                                       minimind_tokenizer, train):
    from transformers import AutoTokenizer
    from export_hf import export
    from model.checkpoint import load_checkpoint
    n = len(AutoTokenizer.from_pretrained(str(minimind_tokenizer)))
    pth = save_minimind_pth(tmp_path / "lm_32.pth", vocab_size=n)
    out = tmp_path / "out"
    result = train("train_pretrain.py", f"--data_path={synthetic / 'pretrain.jsonl'}", f"--out_dir={out}",
                   f"--from_lm={pth}", f"--tokenizer={minimind_tokenizer}", f"--num_heads={TINY_ARCH['num_heads']}",
                   f"--clip_pretrained={vision_file}", *VISION_FLAGS, *RUN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    model, meta = load_checkpoint(out / "pretrain_vlm_32.safetensors")
    assert model.lm_cfg.vocab_size == n + 1 and model.vision_cfg.vision_token_id == n
    assert meta["parts"] == "summary,projector" and meta["source"] == str(pth)
    # The LM was frozen in stage 1: it is the converted MiniMind LM plus one mean-initialised row.
    _, expected = grow_vocab(*read_minimind(pth, num_heads=TINY_ARCH["num_heads"]), n + 1)
    lm_state = model.lm.state_dict()
    assert all(torch.equal(lm_state[k], v) for k, v in expected.items())
    # The grown model exports with a tokenizer that now carries the slot token at the new row.
    folder = export(str(out / "pretrain_vlm_32.safetensors"), tmp_path / "hf", out_dir=out)
    assert AutoTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids(VISION_PAD) == n


def parse(*flags):
    from trainer.cli import build_parser
    return build_parser("pretrain", 1e-3, 1, 4).parse_args(["--data_path=unused.jsonl", *flags])


def save_hf_lm(folder, architecture="llama"):
    """A tiny transformers Llama (or Qwen3: per-head q/k norms) folder."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    config, model = (LlamaConfig, LlamaForCausalLM) if architecture == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    model(config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, rope_theta=5e5,
                 max_position_embeddings=256)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_hf_lm(tmp_path_factory.mktemp("llama") / "llama")


@pytest.mark.parametrize("architecture", ["llama", "qwen3"])
def test_from_lm_takes_the_lm_config_from_the_weights_and_the_rest_from_flags(tmp_path, architecture):
    from trainer.config import resolve_configs
    folder = save_hf_lm(tmp_path / architecture, architecture)
    lm_cfg, vis_cfg, weight_path, lm_state = resolve_configs(parse(f"--from_lm={folder}", "--num_frames=6"))
    assert (lm_cfg.hidden_size, lm_cfg.num_heads, lm_cfg.num_kv_heads, lm_cfg.rope_theta, lm_cfg.vocab_size) == \
        (32, 4, 2, 5e5, 128)
    assert lm_cfg.qk_norm == (architecture == "qwen3") and ("layers.0.attn.q_norm.weight" in lm_state) == lm_cfg.qk_norm
    assert vis_cfg.num_frames == 6 and weight_path is None and set(lm_state) >= {"embed_tokens.weight"}


@pytest.mark.parametrize("flags, words", [
    (["--hidden_size=64"], "hidden_size"),
    (["--from_weight=x.safetensors"], "pick one"),
])
def test_from_lm_refuses_contradicting_flags(llama_folder, flags, words):
    from trainer.config import resolve_configs
    from trainer.errors import TrainingError
    with pytest.raises(TrainingError, match=words):
        resolve_configs(parse(f"--from_lm={llama_folder}", *flags))


def test_a_refused_from_lm_file_is_one_error_line(tmp_path, synthetic, minimind_tokenizer, train):
    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "ran"), "w")
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": Payload()}, tmp_path / "evil.pth")
    result = train("train_pretrain.py", f"--data_path={synthetic / 'pretrain.jsonl'}", f"--out_dir={tmp_path}",
                   f"--from_lm={tmp_path / 'evil.pth'}", f"--tokenizer={minimind_tokenizer}", *RUN_FLAGS)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "refused" in result.stderr
    assert not (tmp_path / "ran").exists()
