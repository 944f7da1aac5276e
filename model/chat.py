"""Chat format: conversations → token ids with assistant-only labels and visual slots per media marker."""
import re

IGNORE = -100
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"]
VISION_PAD = "<|vision_pad|>"
TEXT_CACHE_ENTRIES = 1 << 16   # distinct strings whose ids ChatEncoder keeps (bounded for real corpora)
MEDIA_MARKER = re.compile(r"(<video>|<image>)")
# The same text our ids spell out; stored with the tokenizer so HF tools format chats identically.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class BadSample(ValueError):
    """A sample whose conversation cannot be used; the message says why."""


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names it and what it lacks."""


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


def load_tokenizer(path):
    """A Hugging Face tokenizer folder with the ChatML tokens; a missing <|vision_pad|> is appended.

    MiniMind2's tokenizer has <|endoftext|>, <|im_start|>, <|im_end|> but no slot token. The slot
    token only marks where visual tokens go (its embedding is replaced before the LM sees it), so
    it is appended at id len(tokenizer): deterministic, so training and eval agree on the id. An LM
    started from such a tokenizer's weights grows by that row (trainer --from_lm, model.convert.grow_vocab).
    """
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    missing = [t for t in SPECIAL_TOKENS if t not in vocab and t != VISION_PAD]
    if missing:
        raise TokenizerError(f"{path}: tokenizer lacks special tokens {missing}")
    if VISION_PAD not in vocab:
        tok.add_tokens([VISION_PAD], special_tokens=True)
    return tok


class ChatEncoder:
    """Turns [{"role","content"}, ...] into ids; literal special tokens in text stay plain text."""

    def __init__(self, tokenizer, num_visual_tokens: int):
        self.tok = tokenizer
        self.k = num_visual_tokens
        ids = tokenizer.convert_tokens_to_ids
        self.im_start, self.im_end = ids("<|im_start|>"), ids("<|im_end|>")
        self.vision_pad = ids(VISION_PAD)
        self.pad_id = ids("<|endoftext|>")
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
        """User text with each <video>/<image> marker replaced by its slots (K, or the media's count in
        slot_counts, in marker order); records marker kinds."""
        ids = []
        for piece in MEDIA_MARKER.split(s):
            if piece in ("<video>", "<image>"):
                count = self.k if slot_counts is None else slot_counts[len(media_kinds)]
                media_kinds.append(piece[1:-1])
                ids += [self.vision_pad] * count
            elif piece:
                ids += self.text(piece)
        return ids

    def encode(self, conversations: list, add_generation_prompt=False, slot_counts=None):
        """→ (ids, labels, media_kinds). Labels cover each assistant answer and its <|im_end|>.
        slot_counts: the visual tokens of each marker's media, in order (default: K each)."""
        roles = check_turns(conversations)
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
