"""model/engine.py: greedy replies streamed or not, a left-padded batch answering as single prompts, seeded
sampling, stop strings, characters split over byte tokens, and EngineError for input it cannot use."""
import dataclasses

import pytest
import torch

from conftest import tiny_vlm
from dataset.vlm_dataset import visual_inputs
from model.engine import INPUT_ERRORS, AnswerText, Engine, EngineError, SamplingOptions

CLIP_DIM, FRAMES = 16, 4
GREEDY = SamplingOptions(max_new_tokens=24)


def lively(model):
    """Weights at 1/sqrt(fan-in): a random tiny LM then answers in varied tokens, not one token repeated."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.lm.parameters():
            if p.ndim >= 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def engine(tokenizer, vocab_size):
    return Engine(lively(tiny_vlm(vocab_size=vocab_size, clip_dim=CLIP_DIM, num_frames=FRAMES)), tokenizer, "cpu")


def features(seed, frames=FRAMES):
    return torch.randn(frames, CLIP_DIM, generator=torch.Generator().manual_seed(seed))


def ask(question, media=True):
    return [{"role": "user", "content": ("<video>\n" if media else "") + question}]


class Scripted(torch.nn.Module):
    """A model that answers every row with the same tokens: exact control over what the engine streams."""

    def __init__(self, base, tokens):
        super().__init__()
        self.base, self.tokens = base, tokens
        self.vision_cfg, self.lm_cfg = base.vision_cfg, base.lm_cfg

    def generate(self, input_ids, attention_mask=None, features=None, frame_mask=None, max_new_tokens=32, *_, **__):
        for token in self.tokens[:max_new_tokens]:
            yield torch.full((len(input_ids),), token)


def scripted(engine, text, end=True):
    tokens = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + ([engine.chat.im_end] if end else [])
    return Engine(Scripted(engine.model, tokens), engine.tokenizer)


def test_greedy_reply_is_the_decoded_greedy_tokens_and_its_stream_joins_to_it(engine):
    conversation, media = ask("What happens in the video?"), [features(0)]
    answer = engine.reply(conversation, media, GREEDY)
    ids = torch.tensor([engine.prompt_ids(conversation, media)])
    frames, mask, _ = visual_inputs([("features", media[0])])
    tokens = torch.cat(list(engine.model.generate(ids, None, frames, mask, GREEDY.max_new_tokens))).tolist()
    tokens = tokens[:tokens.index(engine.chat.im_end)] if engine.chat.im_end in tokens else tokens
    assert answer and answer == engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    deltas = []
    assert engine.reply(conversation, media, GREEDY, stream=deltas.append) == answer
    assert len([d for d in deltas if d]) >= 2 and "".join(deltas).strip() == answer


def test_a_left_padded_batch_answers_as_one_prompt_at_a_time(engine):
    conversations = [ask("What colour is the shape?"), ask("Hi", media=False),
                     ask("Describe the video in a few words, please."), ask("Which way does it move?")]
    media = [[features(1)], [], [features(2, frames=3)], [features(3)]]
    alone = [engine.reply(c, m, GREEDY) for c, m in zip(conversations, media)]
    rows = [engine.prompt_ids(c, m) for c, m in zip(conversations, media)]
    width = max(map(len, rows))
    assert len(set(map(len, rows))) > 1   # the batch really is padded
    batch = {"input_ids": torch.tensor([[engine.chat.pad_id] * (width - len(r)) + r for r in rows]),
             "attention_mask": torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])}
    visual = visual_inputs([("features", f) for m in media for f in m])
    assert engine.generate_batch(batch, visual, GREEDY) == alone
    assert len(set(alone)) > 1


def test_the_seed_makes_sampling_reproducible(engine):
    conversation, media = ask("What happens?"), [features(4)]
    sampled = dataclasses.replace(GREEDY, temperature=1.0, top_p=1.0)
    first = engine.reply(conversation, media, sampled)
    assert engine.reply(conversation, media, sampled) == first
    others = {engine.reply(conversation, media, dataclasses.replace(sampled, seed=s)) for s in range(1, 6)}
    assert others - {first}   # another seed, another answer
    assert engine.reply(conversation, media, dataclasses.replace(GREEDY, seed=3)) == engine.reply(
        conversation, media, GREEDY)   # greedy ignores the seed


def test_a_stop_string_ends_the_answer_before_it_and_is_never_streamed(engine):
    model = scripted(engine, "red circle. blue square")
    for stop, expected in ((".", "red circle"), (["square", ". b"], "red circle"), (" blue", "red circle.")):
        deltas = []
        answer = model.reply(ask("Colour?"), [features(5)], SamplingOptions(stop=stop), stream=deltas.append)
        assert answer == expected and "".join(deltas) == expected
    deltas = []
    assert model.reply(ask("Colour?"), [features(5)], SamplingOptions(stop="squares"),
                       stream=deltas.append) == "red circle. blue square"   # a stop that never completes
    assert "".join(deltas) == "red circle. blue square"
    assert SamplingOptions(stop=".").stop == (".",)


def test_a_stop_string_ends_a_real_model_s_answer(engine):
    conversation, media = ask("What colour is the shape?"), [features(0)]
    full = engine.reply(conversation, media, GREEDY)
    stop = full[len(full) // 2:len(full) // 2 + 3]   # first seen at the middle or earlier
    cut = engine.reply(conversation, media, dataclasses.replace(GREEDY, stop=[stop]))
    assert len(stop) == 3 and cut == full[:full.index(stop)].strip() and len(cut) < len(full)


def test_a_character_split_over_byte_tokens_waits_for_its_last_byte(engine):
    text = "a ü 日本 ok"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())   # the tokenizer spells the rare characters byte by byte
    deltas = []
    assert scripted(engine, text).reply(ask("?"), [features(6)], stream=deltas.append) == text
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)
    answer = AnswerText(engine.tokenizer, engine.chat.im_end)
    for token in ids:
        answer.add(token)
        assert text.startswith(answer.settled())


def test_input_the_engine_cannot_use_is_an_engine_error(engine, tmp_path):
    video = [features(7)]
    bad = {"marker without media": (ask("What?"), []),
           "media without marker": (ask("What?", media=False), video),
           "features of another width": (ask("What?"), [torch.zeros(FRAMES, CLIP_DIM + 1)]),
           "more frames than the model takes": (ask("What?"), [features(8, frames=FRAMES + 1)]),
           "last turn not the user's": (ask("What?") + [{"role": "assistant", "content": "red"}], video),
           "turns out of order": ([{"role": "assistant", "content": "hi"}], []),
           "not a list": ("What?", []),
           "longer than the context": (ask("word " * 400), video)}
    for what, (conversation, media) in bad.items():
        with pytest.raises(EngineError):
            engine.reply(conversation, media, GREEDY)
            pytest.fail(what)
    for options in (dict(top_p=0), dict(temperature=-1), dict(max_new_tokens=-1), dict(stop=[""])):
        with pytest.raises(EngineError):
            SamplingOptions(**options)
    with pytest.raises(EngineError, match="audio"):
        engine.read_media(tmp_path / "x.wav", "audio")
    with pytest.raises(EngineError, match="no such file"):
        next(engine.answer_dataset(tmp_path / "missing.jsonl"))
    with pytest.raises(EngineError):
        Engine.load()
    assert EngineError in INPUT_ERRORS


def test_a_model_that_reads_seconds_refuses_media_without_times_in_one_line(tokenizer, vocab_size):
    from dataset.vlm_dataset import MediaEntry
    model = tiny_vlm(vocab_size=vocab_size, clip_dim=CLIP_DIM, num_frames=FRAMES, time_encoding="seconds")
    engine = Engine(model, tokenizer)
    with pytest.raises(EngineError, match="time in seconds"):
        engine.reply(ask("When?"), [features(0)], GREEDY)   # bare features: no clock
    timed = MediaEntry("features", features(0), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert isinstance(engine.reply(ask("When?"), [timed], SamplingOptions(max_new_tokens=2)), str)


def test_a_segment_model_prompts_a_longer_video_with_more_slots_and_answers(tokenizer, vocab_size):
    from dataset.vlm_dataset import MediaEntry
    model = tiny_vlm(vocab_size=vocab_size, clip_dim=CLIP_DIM, num_frames=FRAMES, time_encoding="seconds",
                     num_visual_tokens=8, segment_seconds=1.0)
    engine = Engine(model, tokenizer)
    short = MediaEntry("features", features(0)[:1], torch.tensor([0.0]))
    long = MediaEntry("features", features(0), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    slots = [engine.prompt_ids(ask("When?"), [m]).count(engine.chat.vision_pad) for m in (short, long)]
    assert slots == [2, 8]
    assert isinstance(engine.reply(ask("When?"), [long], SamplingOptions(max_new_tokens=2)), str)
