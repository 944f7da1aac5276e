"""Token-level batching: answers that join and leave one running decode, sharing a KV cache (driven by serve/scheduler.py).

Every row's tokens sit right-aligned in one KV cache of `width` columns: a row of n tokens fills the
last n columns, and the columns to its left are padding its attention never sees. A decoding step
appends one column to every row, so rows stay right-aligned; a joining prompt is prefilled alone
(exactly as Engine.reply prefills it) and copied in at the right edge; when rows leave, the columns
that are padding for every row still there are cut off on the left. So `width` is the longest row,
never more, and a row's positions are 0..n-1 whatever the batch around it looks like.
"""
from dataclasses import dataclass, field

import torch

from model.engine import AnswerText, SamplingOptions
from model.lm import KVCache
from model.vlm import sample_next


@dataclass
class Row:
    """One answer being decoded: its options, what it has said so far and what it may still say."""
    owner: object                    # whoever asked (the scheduler's job); the batch never reads it
    answer: AnswerText
    options: SamplingOptions
    budget: int                      # tokens it may generate in all (max_tokens, cut to the context)
    length: int                      # its tokens in the cache: the prompt, then every fed answer token
    logits: torch.Tensor = None      # (vocab,) scores of its next token
    generator: torch.Generator = None   # its own seeded sampler (None when greedy)
    generated: int = 0
    finish_reason: str = None        # "stop" (end token or a stop string) or "length", once finished

    @property
    def remaining(self) -> int:
        return self.budget - self.generated


@dataclass
class RowBatch:
    """The rows decoding together on one model, and their shared KV cache."""
    model: object                    # a VideoLLM
    rows: list = field(default_factory=list)
    cache: KVCache = None            # len(rows) rows; cache.length is the width

    def prefill(self, ids: list, visual, owner, answer: AnswerText, options: SamplingOptions, budget: int):
        """A new row for the prompt `ids` (its media in `visual`), run alone through the model: the same
        unpadded forward Engine.reply makes, so its first token is the one a lone request gets.
        Returns (row, its cache); join() then copies it into the batch."""
        model = self.model
        device = model.lm.embed_tokens.weight.device
        input_ids = torch.tensor([ids], device=device)
        cache = KVCache(model.lm_cfg, 1, len(ids), device, model.lm.embed_tokens.weight.dtype)
        embeds = model.embed(input_ids, *visual)
        logits = model.lm(embeds, cache=cache, last_only=True)[0, -1]
        generator = None
        if options.temperature > 0:   # seeded as Engine.reply seeds it: a lone row samples what reply samples
            generator = torch.Generator(device=device).manual_seed(options.seed)
        row = Row(owner, answer, options, budget, len(ids), logits, generator)
        return row, cache

    def join(self, joining: list):
        """Add prefilled (row, cache) pairs: one new cache holding every row right-aligned, with room
        for every row's remaining tokens."""
        if not joining:
            return
        rows = self.rows + [row for row, _ in joining]
        sources = ([(self.cache, i) for i in range(len(self.rows))] +
                   [(cache, 0) for _, cache in joining])
        width = max(row.length for row in rows)
        capacity = width + max(row.remaining for row in rows)
        merged = zeroed_cache(self.model, len(rows), capacity)   # zeros: padding must stay finite under the mask
        for layer in range(len(merged.keys)):
            for target, (row, (cache, source)) in enumerate(zip(rows, sources)):
                left = width - row.length
                start = cache.length - row.length
                merged.keys[layer][target, :, left:width] = cache.keys[layer][source, :, start:cache.length]
                merged.values[layer][target, :, left:width] = cache.values[layer][source, :, start:cache.length]
        merged.length = width
        self.rows, self.cache = rows, merged

    def drop(self, leaving: list):
        """Remove rows (finished or abandoned) and the columns no remaining row uses."""
        if not leaving:
            return
        gone = {id(row) for row in leaving}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            return
        width = max(row.length for row in self.rows)
        cut = self.cache.length - width
        index = torch.tensor(keep, device=self.cache.keys[0].device)
        # One indexing op per tensor copies the kept rows' used columns, freeing the rest.
        self.cache.keys = [k[index, :, cut:] for k in self.cache.keys]
        self.cache.values = [v[index, :, cut:] for v in self.cache.values]
        self.cache.length, self.cache.max_len = width, self.cache.max_len - cut

    def pick(self) -> list:
        """Each row's next token from its logits: argmax when greedy, else a draw from its own generator."""
        logits = torch.stack([row.logits for row in self.rows])
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(self.rows):
            if row.generator is not None:
                tokens[i] = int(sample_next(logits[i:i + 1], row.options.temperature, row.options.top_p,
                                            row.generator)[0])
        return tokens

    def step(self, tokens: list):
        """Feed every row its picked token: one forward pass for the whole batch, new logits for each row."""
        model, cache = self.model, self.cache
        device = cache.keys[0].device
        lengths = torch.tensor([row.length for row in self.rows], device=device)
        embeds = model.lm.embed_tokens(torch.tensor(tokens, device=device)[:, None])
        width = cache.length
        if bool((lengths == width).all()):   # no padding: the plain path a lone request takes
            logits = model.lm(embeds, cache=cache)[:, -1]
        else:
            seen = torch.arange(width + 1, device=device)[None, :] >= (width - lengths)[:, None]
            logits = model.lm(embeds, lengths[:, None], seen, cache)[:, -1]
        for row, row_logits in zip(self.rows, logits):
            row.length += 1
            row.logits = row_logits


def zeroed_cache(model, batch: int, capacity: int) -> KVCache:
    cache = KVCache(model.lm_cfg, batch, capacity, model.lm.embed_tokens.weight.device,
                    model.lm.embed_tokens.weight.dtype)
    for tensor in cache.keys + cache.values:
        tensor.zero_()
    return cache
