"""Chat format: conversations → token ids with assistant-only labels and visual slots per media marker."""
import re
from dataclasses import dataclass, replace

IGNORE = -100
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
VISION_PAD = "<|vision_pad|>"
TEXT_CACHE_ENTRIES = 1 << 16   # distinct strings whose ids ChatEncoder keeps (bounded for real corpora)
MEDIA_MARKER = re.compile(r"(<video>|<image>)")
# The same text our ids spell out; stored with the tokenizer so HF tools format chats identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class MediaSlots:
    """The slots of one media: `count` visual tokens in len(stamps) equal groups, each group after its start
    second written as text (" 37"), so the LM can copy the times it reads; stamps None: the slots alone."""
    count: int
    stamps: tuple = None


def stamp_text(seconds: float) -> str:
    """A time segment's start as the text before its visual tokens: the whole second it starts in."""
    return f" {int(seconds + 1e-3)}"


class BadSample(ValueError):
    """A sample whose conversation cannot be used; the message says why."""


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names it and what it lacks."""


@dataclass(frozen=True)
class ChatFormat:
    """How a base LM's turns are marked: turn_start, the role, a newline, the content, turn_end, a newline.

    A base LM answers in the format it was trained on, so the format comes from its tokenizer
    (chat_format) rather than ours being forced onto it.
    """
    name: str
    turn_start: str
    turn_end: str         # also ends an answer: the id generation stops at
    pad: str              # fills batches; never inside a conversation
    default_system: str = ""   # a system turn written when a conversation has none ("" for none)

    @property
    def tokens(self) -> tuple:
        return self.turn_start, self.turn_end, self.pad

    @property
    def template(self) -> str:
        """A Jinja chat template that spells exactly the text ChatEncoder's ids decode to (CHAT_TEMPLATE for ChatML)."""
        start, end = self.turn_start, self.turn_end
        system = (f"{{% if messages[0]['role'] != 'system' %}}{start}system\n{self.default_system}{end}\n{{% endif %}}"
                  if self.default_system else "")
        return (f"{system}{{% for message in messages %}}{start}{{{{ message['role'] }}}}\n{{{{ message['content'] }}}}"
                f"{end}\n{{% endfor %}}{{% if add_generation_prompt %}}{start}assistant\n{{% endif %}}")


# Ours, and MiniMind's since its 2025-04 releases (minimind-3's llm_768.pth included).
CHATML = ChatFormat("ChatML", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
# MiniMind2's first tokenizer (2025-02; MiniMind-V's lm_512.pth then): <s>/</s> around turns, <unk> pads.
MINIMIND2 = ChatFormat("MiniMind2", "<s>", "</s>", "<unk>")
CHAT_FORMATS = (CHATML, MINIMIND2)


def check_turns(conversations) -> list:
    """The role of each turn; BadSample unless turns alternate user/assistant (after an optional system)."""
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("'conversations' must be a non-empty list")
    if isinstance(conversations[0], dict) and conversations[0].get("role") == "system":
        roles = ["system"] + [("user", "assistant")[i % 2] for i in range(len(conversations) - 1)]
    else:
        roles = [("user", "assistant")[i % 2] for i in range(len(conversations))]
    for i, (turn, role) in enumerate(zip(conversations, roles)):
        if not isinstance(turn, dict) or turn.get("role") != role or not isinstance(turn.get("content"), str):
            got = turn.get("role") if isinstance(turn, dict) else type(turn).__name__
            raise BadSample(f"turn {i} is {got!r}, expected a {role!r} turn with text content "
                            "(turns alternate user/assistant, starting with user)")
    return roles


def marker_kinds(conversations) -> list:
    """The kind ("video" or "image") of each marker in order: the slots ChatEncoder.encode makes (user turns only)."""
    return [m[1:-1] for turn in conversations if turn.get("role") == "user"
            for m in MEDIA_MARKER.findall(turn["content"])]


def chat_format(tokenizer, where=None) -> ChatFormat:
    """The format a tokenizer's vocabulary marks turns with: ChatML if it has <|im_start|>/<|im_end|>, else
    MiniMind2's <s>/</s>; TokenizerError (one line naming what it lacks) for neither. The default system
    turn is the one its own chat template writes (template_default_system)."""
    vocab = tokenizer.get_vocab()
    where = where or getattr(tokenizer, "name_or_path", "") or "tokenizer"
    by_turn_tokens = [f for f in CHAT_FORMATS if f.turn_start in vocab and f.turn_end in vocab]
    if not by_turn_tokens:
        lacks = "; ".join(f"{f.name} needs {[t for t in f.tokens if t not in vocab]}" for f in CHAT_FORMATS)
        raise TokenizerError(f"{where}: tokenizer lacks the special tokens of every chat format we know ({lacks})")
    fmt = by_turn_tokens[0]
    if fmt.pad not in vocab:
        raise TokenizerError(f"{where}: tokenizer has the {fmt.name} turn tokens but lacks its pad token {fmt.pad}")
    return replace(fmt, default_system=template_default_system(tokenizer, fmt))


def template_default_system(tokenizer, fmt: ChatFormat) -> str:
    """The system text the tokenizer's own chat template writes for a conversation that has none ("" if none).

    MiniMind's 2025 templates always write one (MiniMind2's `<s>` one and the 2025-04 ChatML one), so
    their LMs never saw a conversation without it; ours and minimind-3's write none.
    """
    if not getattr(tokenizer, "chat_template", None):
        return ""
    probe = "Hi"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except Exception:   # a template that cannot render tells nothing; it is never used to encode
        return ""
    head, end, turn = f"{fmt.turn_start}system\n", f"{fmt.turn_end}\n", f"{fmt.turn_start}user\n{probe}"
    prefix = text.split(turn)[0] if isinstance(text, str) and turn in text else ""
    if prefix.startswith(head) and prefix.endswith(end) and len(prefix) > len(head) + len(end):
        return prefix[len(head):-len(end)]
    return ""


def load_tokenizer(path):
    """A Hugging Face tokenizer folder in a chat format we know (chat_format); a missing <|vision_pad|> is appended.

    MiniMind2's tokenizers (both formats) have no slot token (minimind-3's has). The slot token only
    marks where visual tokens go (its embedding is replaced before the LM sees it), so it is appended at id
    len(tokenizer): deterministic, so training and eval agree on the id. An LM started from such a
    tokenizer's weights grows by that row (trainer --from_lm, model.convert.grow_vocab).
    """
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    chat_format(tok, path)
    if VISION_PAD not in tok.get_vocab():
        tok.add_tokens([VISION_PAD], special_tokens=True)
    return tok


class ChatEncoder:
    """Turns [{"role","content"}, ...] into ids in the tokenizer's chat format; literal special tokens in text
    stay plain text."""

    def __init__(self, tokenizer, num_visual_tokens: int):
        self.tok = tokenizer
        self.k = num_visual_tokens
        self.format = chat_format(tokenizer)
        ids = tokenizer.convert_tokens_to_ids
        # im_start / im_end: the format's turn-start and turn-end ids (ChatML's names, kept for every format).
        self.im_start, self.im_end = ids(self.format.turn_start), ids(self.format.turn_end)
        self.vision_pad = ids(VISION_PAD)
        self.pad_id = ids(self.format.pad)
        # Role lines, questions and short answers recur in sample after sample, and each tokenizer
        # call is slow Python: cached, data loading stops showing in a step (docs/findings.md).
        self._text_ids = {}
        self.cache_entries = TEXT_CACHE_ENTRIES   # a server sets 0: its prompts rarely recur, and would pile up
        self.newline = self.text("\n")

    def text(self, s: str) -> list:
        ids = self._text_ids.get(s)
        if ids is None:
            # split_special_tokens: "<|im_start|>" typed by a user is text, never a control token.
            # verbose=False: the dataset checks lengths against max_len itself (one line per skipped sample).
            ids = self.tok(s, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
            if len(self._text_ids) < self.cache_entries:
                self._text_ids[s] = ids
        return list(ids)

    def content(self, s: str, media_kinds: list, slot_counts=None) -> list:
        """User text with each <video>/<image> marker replaced by its slots (K, or the media's entry in
        slot_counts, in marker order: a count or MediaSlots); records marker kinds."""
        ids = []
        for piece in MEDIA_MARKER.split(s):
            if piece in ("<video>", "<image>"):
                slots = self.k if slot_counts is None else slot_counts[len(media_kinds)]
                media_kinds.append(piece[1:-1])
                ids += self.media_slots(slots if isinstance(slots, MediaSlots) else MediaSlots(slots))
            elif piece:
                ids += self.text(piece)
        return ids

    def media_slots(self, slots: MediaSlots) -> list:
        """The ids a media's marker becomes: its visual slots, each group after its start second as text."""
        if not slots.stamps:
            return [self.vision_pad] * slots.count
        group = slots.count // len(slots.stamps)
        return [i for second in slots.stamps for i in self.text(stamp_text(second)) + [self.vision_pad] * group]

    def encode(self, conversations: list, add_generation_prompt=False, slot_counts=None):
        """→ (ids, labels, media_kinds). Labels cover each assistant answer and its turn-end token.
        slot_counts: the visual tokens of each marker's media, in order (default: K each)."""
        roles = check_turns(conversations)
        if self.format.default_system and roles[0] != "system":
            conversations = [{"role": "system", "content": self.format.default_system}, *conversations]
            roles = ["system", *roles]
        if slot_counts is not None and len(slot_counts) != len(marker_kinds(conversations)):
            raise BadSample(f"{len(marker_kinds(conversations))} <video>/<image> marker(s) for "
                            f"{len(slot_counts)} media item(s)")
        ids, labels, kinds = [], [], []
        for turn, role in zip(conversations, roles):
            head = [self.im_start] + self.text(f"{role}\n")
            if role == "user":
                body = self.content(turn["content"], kinds, slot_counts) + [self.im_end]
                body_labels = [IGNORE] * len(body)
            else:
                body = self.text(turn["content"]) + [self.im_end]
                body_labels = body if role == "assistant" else [IGNORE] * len(body)
            ids += head + body + self.newline
            labels += [IGNORE] * len(head) + body_labels + [IGNORE] * len(self.newline)
        if add_generation_prompt:
            head = [self.im_start] + self.text("assistant\n")
            ids += head
            labels += [IGNORE] * len(head)
        return ids, labels, kinds
