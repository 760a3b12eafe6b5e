"""Gradient (activation) checkpointing of a transformers model whose base is frozen and whose adapters train."""

from __future__ import annotations

import contextlib

from torch import nn

from .errors import RankshareError


def enable_checkpointing(model: nn.Module, options: dict) -> None:
    """A transformers model's own gradient (activation) checkpointing, ``options`` to ``torch.utils.checkpoint``."""
    # transformers >= 5 names it activation_checkpointing_enable and warns on the old name; older ones have only
    # gradient_checkpointing_enable.
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        raise RankshareError(f"{type(model).__name__} has no gradient checkpointing; it is a feature of transformers "
                             "models (PreTrainedModel.gradient_checkpointing_enable).")


def checkpoint_frozen_base(model: nn.Module, options: dict | None = None) -> None:
    """Turn on ``model``'s checkpointing, made safe for a frozen base (``AdaptedModel.gradient_checkpointing_enable``).

    In train mode each checkpointed block (a transformers decoder or encoder layer) then keeps only its input
    and recomputes its activations, adapters included, in the backward pass: the loss and the adapters'
    gradients are those without checkpointing. ``options`` go to ``torch.utils.checkpoint.checkpoint``;
    ``use_reentrant`` defaults to False. Reentrant checkpointing (``use_reentrant=True``) computes gradients
    inside a block only if the block's input requires grad, which with frozen embeddings it never does, so the
    adapters' gradients would be silently lost: for it the input embeddings' output is made to require grad (the
    base's ``enable_input_require_grads()``), as PEFT does.
    """
    options = {"use_reentrant": False, **(options or {})}
    enable_checkpointing(model, options)
    if options["use_reentrant"]:
        # Hook the embeddings once: transformers >= 5 has already hooked them for models fed input_ids, and a
        # second hook would outlive disable_input_require_grads().
        with contextlib.suppress(AttributeError):  # transformers < 5 cannot disable what it never enabled
            model.disable_input_require_grads()
        model.enable_input_require_grads()
