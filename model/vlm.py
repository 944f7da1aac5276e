"""The video LLM: visual tokens from VideoSummary + projector spliced into the LM at <|vision_pad|> slots."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import LMConfig, VisionConfig
from model.lm import KVCache, LanguageModel
from model.static_decode import CompiledSteps, StaticKVCache, static_size
from model.video_summary import build_summary, visual_token_counts


class VideoLLM(nn.Module):
    """Holds the trainable parts only; the frozen CLIP tower lives outside (model.vision.FrameEncoder)."""

    def __init__(self, lm_cfg: LMConfig, vision_cfg: VisionConfig):
        super().__init__()
        self.lm_cfg, self.vision_cfg = lm_cfg, vision_cfg
        self.lm = LanguageModel(lm_cfg)
        self.summary = build_summary(vision_cfg)
        self.projector = nn.Sequential(
            nn.Linear(vision_cfg.summary_dim, lm_cfg.hidden_size), nn.GELU(),
            nn.Linear(lm_cfg.hidden_size, lm_cfg.hidden_size))

    def visual_tokens(self, features, frame_mask, frame_times=None):
        """(N, T, d_clip) CLIP features (frame_times (N, T) their seconds) → (n, d_lm) LM-space tokens, media
        after media in time order: n = N·K, or the sum of visual_token_counts (segment_seconds)."""
        tokens, token_mask = self.summary(features, frame_mask, frame_times)
        tokens = self.projector(tokens)
        return tokens.flatten(0, 1) if token_mask is None else tokens[token_mask]

    def embed(self, input_ids, features=None, frame_mask=None, frame_times=None):
        """Token embeddings with each media's visual tokens written into its slots, in order."""
        x = self.lm.embed_tokens(input_ids)
        slots = input_ids == self.vision_cfg.vision_token_id
        n_slots = int(slots.sum())
        wanted = 0 if features is None else int(visual_token_counts(self.vision_cfg, frame_mask, frame_times).sum())
        if n_slots != wanted:
            n_media = 0 if features is None else features.shape[0]
            raise ValueError(f"{n_slots} visual slots in the text but {n_media} media with {wanted} visual tokens")
        if wanted:
            vis = self.visual_tokens(features.to(x.dtype), frame_mask, frame_times).to(x.dtype)
            x = x.masked_scatter(slots.unsqueeze(-1), vis)
        return x

    def forward(self, input_ids, labels=None, features=None, frame_mask=None, frame_times=None,
                position_ids=None, segments=None):
        """Returns logits, or with labels (-100 = ignored) the summed token loss and the token count.
        position_ids and segments: a packed batch's (dataset/packing.py)."""
        hidden = self.lm.hidden(self.embed(input_ids, features, frame_mask, frame_times), position_ids,
                                segments=segments)
        if labels is None:
            return self.lm.logits(hidden)
        targets = labels[:, 1:]
        scored = targets != -100
        if bool(scored.all()):   # every position has a target: no gather (and scatter back) needed
            logits = self.lm.logits(hidden[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum"), scored.sum()
        # Only positions with a target go through the output head: in SFT most positions are
        # prompt and visual tokens, and their logits would be computed only to be ignored.
        logits = self.lm.logits(hidden[:, :-1][scored])
        return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), scored.sum()

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, features=None, frame_mask=None,
                 max_new_tokens=32, temperature=0.0, top_p=1.0, eos_id=None, generator=None, frame_times=None,
                 compiled=False):
        """Yield the next token of every row, step by step (streaming); prompts are left-padded.

        temperature 0 is greedy; otherwise sample from the top-p nucleus. Rows that produced
        eos_id keep yielding eos_id; iteration stops when all rows are done. compiled: decoding steps
        at static shapes through torch.compile (model/static_decode.py), the same tokens.
        """
        with self.lm.frozen_weights():
            yield from self._generate(input_ids, attention_mask, (features, frame_mask, frame_times),
                                      max_new_tokens, temperature, top_p, eos_id, generator, compiled)

    def _generate(self, input_ids, attention_mask, visual, max_new_tokens, temperature, top_p, eos_id, generator,
                  compiled=False):
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        # Without padding the LM takes its plain causal path: no masks, positions from the cache.
        padded = not bool(attention_mask.all())
        total = min(L + max_new_tokens, self.lm_cfg.max_seq_len)
        size = static_size(total, self.lm_cfg.max_seq_len) if compiled else total
        cache = (StaticKVCache if compiled else KVCache)(self.lm_cfg, B, size, input_ids.device,
                                                         self.lm.embed_tokens.weight.dtype)
        mask = torch.zeros(B, size, dtype=torch.bool, device=input_ids.device)
        mask[:, :L] = attention_mask.bool()
        positions = (mask[:, :L].long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids, *visual)
        if padded:
            logits = self.lm(embeds, positions, mask, cache, last_only=True)[:, -1]
        else:
            logits = self.lm(embeds, cache=cache, last_only=True)[:, -1]
        advance = self._static_steps(cache, mask, positions) if compiled else self._eager_steps(cache, mask, positions, padded)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(total - L):
            token = sample_next(logits, temperature, top_p, generator)
            if eos_id is not None:
                token = torch.where(done, torch.full_like(token, eos_id), token)
                done |= token == eos_id
                if bool(done.all()):
                    yield token
                    return
            yield token
            if cache.length >= total:
                return
            logits = advance(self.lm.embed_tokens(token[:, None]))

    def _eager_steps(self, cache, mask, positions, padded):
        """step(embeds) → logits, through the LM's dynamic path (the cache sliced to what it holds)."""
        next_pos = positions[:, -1:] + 1

        def step(embeds):
            nonlocal next_pos
            if not padded:
                return self.lm(embeds, cache=cache)[:, -1]
            mask[:, cache.length] = True
            logits = self.lm(embeds, next_pos, mask, cache)[:, -1]
            next_pos = next_pos + 1
            return logits
        return step

    def _static_steps(self, cache, mask, positions):
        """step(embeds) → logits, through the compiled static-shape step (built once per model)."""
        if getattr(self, "_compiled_steps", None) is None:
            self._compiled_steps = CompiledSteps(self.lm)
        key_bias = torch.zeros(mask.shape, dtype=cache.keys[0].dtype, device=mask.device)
        key_bias = key_bias.masked_fill_(~mask, float("-inf"))[:, None, None, :]
        next_pos = positions[:, -1:] + 1

        def step(embeds):
            nonlocal next_pos
            slot = torch.tensor([cache.length], device=embeds.device)
            logits = self._compiled_steps(cache, embeds, next_pos, slot, key_bias)
            cache.length += 1
            next_pos = next_pos + 1
            return logits
        return step


def sample_next(logits, temperature: float, top_p: float, generator=None):
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
