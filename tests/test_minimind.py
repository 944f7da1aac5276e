"""Every MiniMind base LM a user can download goes in, each in the chat format it was trained on: MiniMind2
(lm_512.pth's layout, its <s>/</s> tokenizer) and minimind-3 (llm_768.pth's per-head q/k norms, ChatML), through
convert → export to transformers → train_pretrain.py --from_lm → eval.py."""
import json

import pytest
import torch

from conftest import run_python
from test_chat import labelled_spans
from test_convert import IDS, build_lm, minimind3_logits, minimind3_state, minimind_logits, minimind_state, our_logits
from test_from_lm import RUN_FLAGS, VISION_FLAGS, minimind_like_tokenizer
from model.chat import CHATML, MINIMIND2, VISION_PAD, ChatEncoder, load_tokenizer
from model.convert import grow_vocab, read_lm

SYSTEM = "You are a small test assistant."
# A template of MiniMind2's kind, written for this test: <s>/</s> around turns, and a system turn of its
# own whenever a conversation brings none (so the LM never saw a conversation without one).
S_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}<s>system\n{{ messages[0]['content'] }}</s>\n"
    "{% else %}<s>system\n" + SYSTEM + "</s>\n{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<s>user\n{{ message['content'] }}</s>\n<s>assistant\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}</s>\n{% endif %}{% endfor %}")
RELEASES = {   # what each release's files look like, and what our side must make of them
    "MiniMind2": dict(specials=("<unk>", "<s>", "</s>"), template=S_TEMPLATE, state=minimind_state,
                      logits=minimind_logits, flags=["--num_heads=4"], format=MINIMIND2, default_system=SYSTEM,
                      architecture="LlamaForCausalLM", prompt_start=f"<s>system\n{SYSTEM}</s>\n<s>user\n"),
    # minimind-3's tokenizer has a slot token of its own, and no flag is needed: q_norm's size gives the heads.
    "minimind-3": dict(specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_PAD), template=None,
                       state=minimind3_state, logits=minimind3_logits, flags=[], format=CHATML, default_system="",
                       architecture="Qwen3ForCausalLM", prompt_start="<|im_start|>user\n"),
}
PROMPT = "Describe a red circle."


@pytest.fixture(scope="module", params=list(RELEASES))
def release(request, tmp_path_factory, synthetic, vision_file, train):
    """A release's tokenizer folder and .pth, converted; a video LLM pretrained on it with --from_lm and exported."""
    from transformers import AutoTokenizer
    from convert_minimind import main as convert
    from export_hf import export
    spec = dict(RELEASES[request.param], name=request.param)
    tmp = tmp_path_factory.mktemp(request.param)
    spec["tokenizer"] = minimind_like_tokenizer(tmp / "tokenizer", synthetic, spec["specials"], spec["template"])
    spec["vocab"] = len(AutoTokenizer.from_pretrained(str(spec["tokenizer"])))
    spec["sd"] = spec["state"](seed=2, vocab=spec["vocab"])
    spec["pth"] = tmp / "lm.pth"
    torch.save(spec["sd"], spec["pth"])
    convert([f"--lm={spec['pth']}", f"--out={tmp / 'lm.safetensors'}", *spec["flags"]])
    spec["converted"] = read_lm(tmp / "lm.safetensors")
    out = tmp / "out"
    result = train("train_pretrain.py", f"--data_path={synthetic / 'pretrain.jsonl'}", f"--out_dir={out}",
                   f"--from_lm={spec['pth']}", f"--tokenizer={spec['tokenizer']}", f"--clip_pretrained={vision_file}",
                   *spec["flags"], *VISION_FLAGS, *RUN_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    spec["checkpoint"] = out / "pretrain_vlm_32.safetensors"
    spec["hf"] = export(str(spec["checkpoint"]), tmp / "hf", out_dir=out)
    return spec


def test_conversion_gives_the_logits_of_minimind_s_own_forward(release):
    cfg, state = release["converted"]
    assert cfg.qk_norm == (release["name"] == "minimind-3") and cfg.vocab_size == release["vocab"]
    diff = (our_logits(build_lm(cfg, state), IDS) - release["logits"](release["sd"], IDS)).abs().max().item()
    print(f"{release['name']} → ours: max |Δlogits| = {diff:.3g}")
    assert diff < 1e-4


def test_the_encoder_speaks_the_base_lm_s_chat_format(release):
    from transformers import AutoTokenizer
    chat = ChatEncoder(load_tokenizer(release["tokenizer"]), 2)
    assert chat.format.turn_start == release["format"].turn_start and chat.format.pad == release["format"].pad
    assert chat.format.default_system == release["default_system"]
    conv = [{"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "red"},
            {"role": "user", "content": "Which way?"}, {"role": "assistant", "content": "left"}]
    ids, labels, _ = chat.encode(conv)
    turn_end = release["format"].turn_end
    answers = [chat.tok.decode(span) for span in labelled_spans(labels)]
    assert answers == [f"red{turn_end}", f"left{turn_end}"]   # each answer and its end token, nothing else
    if release["template"]:   # the ids spell what the release's own template writes
        plain = AutoTokenizer.from_pretrained(str(release["tokenizer"]))
        assert chat.tok.decode(ids) == plain.apply_chat_template(conv, tokenize=False)
    system = [{"role": "system", "content": "Be brief."}, *conv]   # a given system turn replaces the default
    assert chat.tok.decode(chat.encode(system)[0]).startswith(f"{chat.format.turn_start}system\nBe brief.{turn_end}")


def test_the_export_is_the_release_s_transformers_class_with_identical_greedy_tokens(release):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from model.checkpoint import load_checkpoint
    folder = release["hf"]
    config = json.loads((folder / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    model, _ = load_checkpoint(release["checkpoint"])
    chat = ChatEncoder(load_tokenizer(release["tokenizer"]), model.vision_cfg.num_visual_tokens)
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert config["architectures"] == [release["architecture"]] and type(hf).__name__ == release["architecture"]
    assert eos == chat.im_end == hf_tok.convert_tokens_to_ids(release["format"].turn_end)
    messages = [{"role": "user", "content": PROMPT}]
    ids, _, _ = chat.encode(messages, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat.tok.decode(ids)
    x = torch.tensor([ids])
    ours = torch.stack(list(model.eval().generate(x, max_new_tokens=24)), 1)[0].tolist()
    with torch.no_grad():
        theirs = hf.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=chat.pad_id)[0, len(ids):].tolist()
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
    assert ours == theirs


def test_pretraining_from_the_pth_then_eval_answers_in_the_base_lm_s_format(release):
    from transformers import AutoModelForCausalLM
    from model.engine import Engine
    engine = Engine.load(weight=str(release["checkpoint"]))
    grows = VISION_PAD not in release["specials"]   # only a tokenizer without a slot token adds a row
    assert engine.model.lm_cfg.vocab_size == release["vocab"] + grows
    # The LM stayed frozen in stage 1: it is the converted release (plus the slot row where one was added).
    cfg, state = release["converted"]
    expected = grow_vocab(cfg, state, release["vocab"] + 1)[1] if grows else state
    assert all(torch.equal(engine.model.lm.state_dict()[k], v) for k, v in expected.items())
    messages = [{"role": "user", "content": PROMPT}]
    ids, _, _ = engine.chat.encode(messages, add_generation_prompt=True)
    assert engine.tokenizer.decode(ids).startswith(release["prompt_start"]) and ids[0] == engine.chat.im_start
    assert engine.chat.im_end == engine.tokenizer.convert_tokens_to_ids(release["format"].turn_end)   # ends answers
    result = run_python("eval.py", f"--weight={release['checkpoint']}", f"--prompt={PROMPT}", "--temperature=0",
                        "--max_new_tokens=16", "--device=cpu")
    assert result.returncode == 0, result.stderr
    hf = AutoModelForCausalLM.from_pretrained(release["hf"]).eval()
    with torch.no_grad():   # transformers' greedy answer on the same prompt, ended by the release's end token
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=engine.chat.im_end,
                          pad_token_id=engine.chat.pad_id)[0, len(ids):]
    expected_answer = engine.tokenizer.decode(out, skip_special_tokens=True).strip()
    print(f"{release['name']}: eval.py answered {result.stdout.strip()!r}")
    assert expected_answer and result.stdout.strip() == expected_answer


def test_export_with_a_tokenizer_in_no_known_format_is_one_error_line(release, tmp_path, synthetic, capsys):
    from export_hf import main
    odd = minimind_like_tokenizer(tmp_path / "odd", synthetic, ("<pad>", "<bos>", "<eos>"))
    with pytest.raises(SystemExit) as exit_code:
        main([f"--weight={release['checkpoint']}", f"--out={tmp_path / 'hf'}", f"--tokenizer={odd}"])
    err = capsys.readouterr().err
    assert exit_code.value.code == 1 and err.count("\n") == 1 and "lacks" in err and "<s>" in err, err
