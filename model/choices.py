"""Answers scored by likelihood: the log-probability of an answer after its prompt, and multiple choice by it.

A question that offers its answers ("Which happens first: A or B?", a lettered NExT-QA question) can be
answered two ways: the model writes an answer (generation, what a user gets), or each offered answer is
scored by the log-likelihood the model gives it as the whole reply, end token included (what benchmark
harnesses call multiple-choice scoring; benchmarks/lmms_model.py scores lmms-eval's options the same way).
The gap between the two tells whether the model knows the answer but fails to say it.
"""
import torch

from dataset.vlm_dataset import VisualInputs


def row_visual(visual: VisualInputs, start: int, stop: int, copies: int) -> VisualInputs:
    """The media [start, stop) of a batch, repeated for each of `copies` rows (each row holds them all)."""
    if visual.features is None or start == stop:
        return VisualInputs()
    return VisualInputs(*(None if t is None else t[start:stop].repeat(copies, *[1] * (t.dim() - 1))
                          for t in visual))


@torch.no_grad()
def answer_loglikelihoods(model, rows, visual: VisualInputs, pad_id: int) -> list:
    """(summed log-probability of the answer's tokens, whether greedy decoding gives exactly them) per
    (prompt ids, answer ids) row, in one forward pass; visual: the rows' media in row order."""
    device = next(model.parameters()).device
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    # Right padding: causal attention keeps every real token's logits as they are unpadded.
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        ids[row, :len(prompt) + len(answer)] = torch.tensor(list(prompt) + list(answer))
    logits = model(ids.to(device), features=visual.features, frame_mask=visual.frame_mask,
                   frame_times=visual.frame_times).float()
    results = []
    for row, (prompt, answer) in enumerate(rows):
        steps = logits[row, len(prompt) - 1:len(prompt) + len(answer) - 1].log_softmax(-1)
        target = torch.as_tensor(answer, device=steps.device)
        results.append((float(steps.gather(1, target[:, None]).sum()), bool((steps.argmax(-1) == target).all())))
    return results


def ranked_choices(model, batch, visual: VisualInputs, pad_id: int) -> list:
    """Per row of a left-padded generation batch: (the likeliest choice, each choice's log-likelihood), or
    None where the record offers none. batch["choice_ids"]: each choice's answer ids (its text, end token)."""
    starts = [0]
    for count in batch["media_counts"]:
        starts.append(starts[-1] + count)
    ranked = []
    for row, choices in enumerate(batch.get("choices") or [None] * batch["size"]):
        if not choices:
            ranked.append(None)
            continue
        prompt = batch["input_ids"][row][batch["attention_mask"][row]].tolist()
        rows = [(prompt, answer) for answer in batch["choice_ids"][row]]
        visual_rows = row_visual(visual, starts[row], starts[row + 1], len(choices))
        scores = [score for score, _ in answer_loglikelihoods(model, rows, visual_rows, pad_id)]
        ranked.append((choices[max(range(len(choices)), key=scores.__getitem__)], scores))
    return ranked
