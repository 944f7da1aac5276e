"""Multiple choice by likelihood: each offered answer scored as the model's reply, the likeliest one taken.

A question that offers its answers ("Which happens first: A or B?", a lettered NExT-QA question) can be
answered two ways: the model writes an answer (generation, what a user gets), or each offered answer is
scored by the log-likelihood the model gives it as the whole reply, end token included (what benchmark
harnesses call multiple-choice scoring). The gap between the two tells whether the model knows the
answer but fails to say it.
"""
import torch
import torch.nn.functional as F

from dataset.vlm_dataset import VisualInputs
from model.chat import IGNORE


def row_visual(visual: VisualInputs, start: int, stop: int, copies: int) -> VisualInputs:
    """The media [start, stop) of a batch, repeated for each of `copies` rows (each row holds them all)."""
    if visual.features is None or start == stop:
        return VisualInputs()
    return VisualInputs(*(None if t is None else t[start:stop].repeat(copies, *[1] * (t.dim() - 1))
                          for t in visual))


@torch.no_grad()
def choice_loglikelihoods(model, encoded, visual: VisualInputs, pad_id: int) -> list:
    """The summed log-probability of each choice's answer tokens (labels != IGNORE) given what precedes them.

    encoded: one (ids, labels) per choice, the same conversation answered with each; visual: the media of
    that one conversation, already repeated once per choice (row_visual)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (row_ids, row_labels) in enumerate(encoded):   # right padding: a causal model never reads it
        ids[row, :len(row_ids)], labels[row, :len(row_labels)] = row_ids, row_labels
    logits = model(ids.to(device), features=visual.features, frame_mask=visual.frame_mask,
                   frame_times=visual.frame_times)
    targets = labels[:, 1:].to(device)
    scored = targets != IGNORE
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return (logprobs.squeeze(-1) * scored).sum(dim=1).tolist()


def ranked_choices(model, batch, visual: VisualInputs, pad_id: int) -> list:
    """Per batch row: (the likeliest choice, each choice's log-likelihood), or None where the record offers none."""
    starts = [0]
    for count in batch["media_counts"]:
        starts.append(starts[-1] + count)
    ranked = []
    for row, choices in enumerate(batch.get("choices") or [None] * batch["size"]):
        if not choices:
            ranked.append(None)
            continue
        rows_visual = row_visual(visual, starts[row], starts[row + 1], len(choices))
        scores = choice_loglikelihoods(model, batch["choice_ids"][row], rows_visual, pad_id)
        ranked.append((choices[max(range(len(choices)), key=scores.__getitem__)], scores))
    return ranked
