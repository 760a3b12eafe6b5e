"""A few optimiser steps change only the adapters and the modules saved whole."""

from __future__ import annotations

import torch

from conftest import run


def test_only_adapters_and_saved_modules_change(adapted, family):
    before = {name: p.detach().clone() for name, p in adapted.named_parameters()}
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    optimiser = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    for _ in range(3):
        loss = run(adapted, family.inputs()).pow(2).mean()
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    changed = {name for name, p in adapted.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable
    saved = {tensor.data_ptr() for tensor in adapted.adapter_state_dict().values()}
    assert {p.data_ptr() for name, p in adapted.named_parameters() if name in trainable} <= saved
    assert not any(".base_layer." in name for name in trainable)
