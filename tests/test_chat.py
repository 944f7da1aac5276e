"""ChatEncoder: assistant-only labels, multi-turn layout, chat-template parity, literal special tokens, the chat
format read from the tokenizer."""
import pytest

from model.chat import CHAT_TEMPLATE, CHATML, IGNORE, BadSample, ChatEncoder, load_tokenizer

K = 3


@pytest.fixture(scope="module")
def chat(tokenizer):
    return ChatEncoder(tokenizer, K)


def conversation(*texts):
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def labelled_spans(labels):
    """Runs of consecutive non-ignored labels."""
    spans, current = [], []
    for label in labels:
        if label == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def collapse_slots(ids, chat, kinds):
    """Decode ids with each run of K vision_pad ids turned back into its <video>/<image> marker."""
    out, i, kinds = [], 0, iter(kinds)
    while i < len(ids):
        if ids[i] == chat.vision_pad:
            assert ids[i:i + K] == [chat.vision_pad] * K
            out.append(f"<{next(kinds)}>")
            i += K
        else:
            j = i
            while j < len(ids) and ids[j] != chat.vision_pad:
                j += 1
            out.append(chat.tok.decode(ids[i:j]))
            i = j
    return "".join(out)


def test_labels_cover_only_each_answer_and_its_im_end(chat):
    conv = conversation("<video>\nWhat colour is it?", "red", "Which way?", "left")
    ids, labels, kinds = chat.encode(conv)
    assert len(ids) == len(labels) and kinds == ["video"]
    spans = labelled_spans(labels)
    assert [chat.tok.decode(s) for s in spans] == ["red<|im_end|>", "left<|im_end|>"]
    for i, label in enumerate(labels):
        assert label in (IGNORE, ids[i])


def test_multi_turn_ids_decode_to_the_tokenizers_chat_template(chat, tokenizer):
    conv = conversation("<video>\nDescribe the video.", "A red circle moves left.",
                        "How many shapes?", "one", "And <image> here?", "two")
    ids, _, kinds = chat.encode(conv)
    assert kinds == ["video", "image"]
    assert ids.count(chat.vision_pad) == 2 * K
    assert collapse_slots(ids, chat, kinds) == tokenizer.apply_chat_template(conv, tokenize=False)


def test_generation_prompt_matches_the_template_too(chat, tokenizer):
    conv = conversation("<image>\nWhat shape?")
    ids, labels, _ = chat.encode(conv, add_generation_prompt=True)
    assert set(labels) == {IGNORE}
    expected = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert collapse_slots(ids, chat, ["image"]) == expected


def test_system_turn_is_never_labelled(chat):
    conv = [{"role": "system", "content": "Be brief."}, *conversation("hi", "yes")]
    _, labels, _ = chat.encode(conv)
    assert [chat.tok.decode(s) for s in labelled_spans(labels)] == ["yes<|im_end|>"]


@pytest.mark.parametrize("literal", ["<|im_start|>", "<|vision_pad|>", "<video>", "<|im_end|>", "<|endoftext|>"])
def test_special_text_in_an_answer_stays_plain_text(chat, literal):
    ids, labels, kinds = chat.encode(conversation("<video>\nSay it.", f"a {literal} b"))
    controls = {chat.im_start, chat.im_end, chat.vision_pad, chat.pad_id}
    # Only the markup's own control ids: one im_start/im_end per turn, K slots for the one marker.
    assert ids.count(chat.vision_pad) == K and ids.count(chat.im_start) == 2
    assert ids.count(chat.im_end) == 2 and chat.pad_id not in ids
    answer = labelled_spans(labels)[0]
    assert not set(answer[:-1]) & controls
    assert chat.tok.decode(answer) == f"a {literal} b<|im_end|>"
    assert kinds == ["video"]


@pytest.mark.parametrize("literal", ["<|vision_pad|>", "<|im_start|>", "<|im_end|>"])
def test_special_text_in_user_text_creates_no_slot_or_control(chat, literal):
    with_literal, _, kinds = chat.encode(conversation(f"<video>\nwhat is {literal}?", "x"))
    assert kinds == ["video"]
    assert with_literal.count(chat.vision_pad) == K
    assert with_literal.count(chat.im_start) == 2 and with_literal.count(chat.im_end) == 2


@pytest.mark.parametrize("roles", [["assistant", "user"], ["user", "user"], ["user", "assistant", "assistant"],
                                   ["user", "system"]])
def test_wrong_role_order_is_a_bad_sample(chat, roles):
    conv = [{"role": r, "content": "hi"} for r in roles]
    with pytest.raises(BadSample, match="turn"):
        chat.encode(conv)


@pytest.mark.parametrize("conv", [[], "not a list", [{"role": "user", "content": 3}], [["user", "hi"]]])
def test_malformed_conversations_are_bad_samples(chat, conv):
    with pytest.raises(BadSample):
        chat.encode(conv)


def test_role_words_are_single_tokens_of_the_trained_tokenizer(chat):
    # train_tokenizer.py trains on the text as the template spells it, role lines included.
    assert len(chat.text("user\n")) == 2 and len(chat.text("assistant\n")) == 2


def test_cached_text_ids_are_the_tokenizers_and_safe_to_change(chat):
    text = "What colour is the ring?"
    fresh = chat.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    first = chat.text(text)
    first.append(-1)   # a caller that extends the ids it got must not change what the next one gets
    assert chat.text(text) == fresh


def test_each_marker_gets_the_slots_its_media_is_given(chat):
    conv = [{"role": "user", "content": "<video>\nThis one <image> and that?"}, {"role": "assistant", "content": "x"}]
    ids, labels, kinds = chat.encode(conv, slot_counts=[5, 2])
    slots = [i for i, t in enumerate(ids) if t == chat.vision_pad]
    assert kinds == ["video", "image"] and len(slots) == 7
    assert slots[5] > slots[4] + 1                           # the video's 5, the text, then the image's 2
    assert chat.encode(conv)[0].count(chat.vision_pad) == 2 * chat.k
    with pytest.raises(BadSample, match="2 <video>/<image> marker"):
        chat.encode(conv, slot_counts=[5])


def test_our_tokenizer_speaks_chatml_with_our_template_and_no_default_system(chat):
    assert chat.format == CHATML and CHATML.template == CHAT_TEMPLATE and CHATML.default_system == ""
    ids = chat.tok.convert_tokens_to_ids
    assert (chat.im_start, chat.im_end, chat.pad_id) == (ids("<|im_start|>"), ids("<|im_end|>"), ids("<|endoftext|>"))


def test_a_system_turn_the_tokenizers_template_writes_by_default_is_written_when_none_is_given(tokenizer_dir):
    """MiniMind's 2025 templates add a system turn to every conversation without one; its LMs always saw it."""
    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
                         "{% endif %}" + CHAT_TEMPLATE)
    chat = ChatEncoder(tok, K)
    assert chat.format.default_system == "Be kind."
    conv = conversation("hi", "yes")
    ids, labels, _ = chat.encode(conv)
    assert tok.decode(ids) == tok.apply_chat_template(conv, tokenize=False)
    assert [tok.decode(s) for s in labelled_spans(labels)] == ["yes<|im_end|>"]   # the system turn is never labelled
    tok.chat_template = chat.format.template   # the template an export writes spells the same ids
    assert tok.apply_chat_template(conv, tokenize=False) == tok.decode(ids)


def test_a_split_digit_tokenizer_spells_unseen_numbers_with_the_seen_digits(synthetic, tmp_path):
    from model.chat import load_tokenizer
    from model.tokenizer import train_tokenizer
    texts = [synthetic / f"{s}.jsonl" for s in ("pretrain", "sft_video")]
    train_tokenizer(texts, tmp_path / "digits", 512, split_digits=True)
    tok = load_tokenizer(tmp_path / "digits")
    text = "from 87.5 s to 112.0 s"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("875") + list("1120")
    assert tok.decode(ids) == text
