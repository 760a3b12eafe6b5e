"""What a fine-tuned adapter costs the base model: its language-modelling loss on held-out general text.

The text is the first articles (64 in the study) of BBC News's test split, seed 0's split as every part uses: no run
of the study trains on them (the skills set's news task trains on the first words of training-split articles). Each
article is plain text, no chat template, cut at ``TOKENS`` tokens. The loss is the mean next-token negative
log-likelihood over all their tokens, in nats; ``change`` is the adapted model's loss minus the base model's, so
a positive change is forgetting.
"""

from __future__ import annotations

import torch

from ..finetune.data import builtin_splits

TOKENS = 128
BATCH = 8


def held_out_articles(count: int) -> list[str]:
    _labels, (_train, _validation, test) = builtin_splits(0)["news"]
    return [example.text for example in test[:count]]


@torch.no_grad()
def language_model_loss(model, tokenizer, device, count: int) -> tuple[float, int]:
    """Mean next-token loss over ``count`` held-out articles, and the number of tokens it averages."""
    model.eval()
    total, tokens = 0.0, 0
    articles = held_out_articles(count)
    for start in range(0, len(articles), BATCH):
        batch = articles[start : start + BATCH]
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:TOKENS] for text in batch]
        width = max(len(row) for row in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: the causal mask keeps real tokens from seeing it
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets, counted = ids[:, 1:], mask[:, 1:].bool()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total += losses[counted].sum().item()
        tokens += counted.sum().item()
    return total / tokens, tokens


def forgetting(model, space, count: int) -> dict:
    """The held-out loss of ``model`` and of the base model of ``space`` (computed once per workspace)."""
    if not hasattr(space, "held_out_base_loss"):
        space.held_out_base_loss = language_model_loss(space.fresh_base().to(space.device), space.tokenizer,
                                                       space.device, count)[0]
    loss, tokens = language_model_loss(model, space.tokenizer, space.device, count)
    return {"loss": loss, "base_loss": space.held_out_base_loss, "change": loss - space.held_out_base_loss,
            "articles": count, "tokens": tokens}
