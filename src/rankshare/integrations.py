"""Training an adapted model at scale: DistributedDataParallel, FSDP2, and transformers' ``Trainer``.

**DistributedDataParallel** needs nothing from rankshare: wrap the ``AdaptedModel`` as any module. LoTR's
factors U, V are registered once (in ``AdaptedModel.shared[adapter name]``), so DDP holds one gradient for each, summed
over every layer of its group, and all-reduces it like any other parameter: every rank ends each step
with the same U and V.

**FSDP2** (``torch.distributed.fsdp.fully_shard``) works when the unit that shards a group's U and V
also encloses every layer that uses them: a unit gathers its parameters in its own forward, and no
``LotrGroup`` ever runs a forward (its layers read U and V directly). ``fully_shard_adapted`` shards each
block (e.g. each transformer layer) as a unit and then the ``AdaptedModel`` itself, so that the root unit
owns the shared factors and gathers them before any layer runs. ``check_fsdp_sharding`` refuses the two
wrappings that break this: a group sharded as a unit of its own (its factors would reach the layers still
sharded), and shared factors outside every unit (their gradients would never be averaged over ranks, so
the ranks' U and V would drift apart). ``full_adapter_state_dict`` gathers the sharded adapter tensors
for saving. Checked on CPU with the gloo backend: steps on 2 ranks match 1 process on the whole batch.

**Trainer**: ``AdapterTrainer`` is ``transformers.Trainer`` for an ``AdaptedModel``. Its checkpoints hold
the adapter files (``adapter_config.json``, ``adapter_model.safetensors``) instead of the whole base
model, and resuming, or loading the best model at the end, copies a checkpoint's adapter tensors into the
running model in place, with the checks of ``AdaptedModel.from_pretrained``. That behaviour is the mixin
``AdapterCheckpoints``, which ``rankshare.sft.AdapterSFTTrainer`` puts on TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import inspect
import os

import torch
import transformers
from torch import nn
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import can_return_loss, find_labels

from .errors import RankshareError
from .model import AdaptedModel

# -- FSDP2 ------------------------------------------------------------------------------------------------


def fully_shard_adapted(model: AdaptedModel, block_types: tuple[type[nn.Module], ...], **fsdp_options) -> AdaptedModel:
    """Shard every module of a type in ``block_types`` as an FSDP2 unit, then the whole ``AdaptedModel``.

    The root unit owns what no block holds: the embeddings, the head, and LoTR's shared factors, which
    it gathers before any block runs. ``fsdp_options`` go to every ``fully_shard`` call (``mesh``,
    ``reshard_after_forward``, ``mp_policy``, ...). Returns ``model``, now an FSDP module; call it on
    every rank, before building the optimizer.
    """
    from torch.distributed.fsdp import fully_shard

    if not isinstance(model, AdaptedModel):
        raise RankshareError(f"fully_shard_adapted() needs an AdaptedModel (from rankshare.adapt), got "
                             f"{type(model).__name__}.")
    blocks = [module for module in model.base_model.modules() if isinstance(module, tuple(block_types))]
    if not blocks:
        raise RankshareError(
            f"No module of the model is a {', '.join(t.__name__ for t in block_types)}; give block_types the class of "
            f"the model's repeated blocks (for {type(model.base_model).__name__}, its transformer layer class)."
        )
    for block in blocks:
        fully_shard(block, **fsdp_options)
    fully_shard(model, **fsdp_options)
    check_fsdp_sharding(model)
    return model


def check_fsdp_sharding(model: AdaptedModel) -> None:
    """Raise RankshareError if an FSDP2 wrapping separates LoTR's shared factors from the layers using them.

    Does nothing for a model that FSDP has not touched.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        return
    groups = {f"{name}.{key}": (group, owner) for name, owner in model.shared.items() for key, group in owner.items()}
    for key, (group, owner) in groups.items():
        if any(isinstance(module, FSDPModule) for module in (group, owner, model.shared)):
            raise RankshareError(
                f"The shared factors 'shared.{key}' are sharded as an FSDP unit of their own, but a unit gathers its "
                "tensors in its forward, and the LoTR layers read U and V directly, so they would meet the factors "
                "still sharded. Do not fully_shard model.shared or its groups; let the AdaptedModel itself be the "
                "unit that owns them (fully_shard_adapted does this)."
            )
        # The AdaptedModel as a unit owns them; so does a unit around it, which leaves them sharded.
        owned = isinstance(model, FSDPModule) or all(isinstance(p, DTensor) for p in group.parameters())
        if not owned:
            raise RankshareError(
                f"The shared factors 'shared.{key}' belong to no FSDP unit, so their gradients would not be averaged "
                "over the ranks and each rank's U and V would drift apart. Call fully_shard on the AdaptedModel "
                "itself after its blocks (fully_shard_adapted does this)."
            )


def full_adapter_state_dict(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """``model.adapter_state_dict()`` with every FSDP-sharded tensor gathered whole.

    A collective: call it on every rank.
    """
    from torch.distributed.tensor import DTensor

    return {
        key: tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        for key, tensor in model.adapter_state_dict().items()
    }


# -- transformers.Trainer ---------------------------------------------------------------------------------


class AdapterCheckpoints:
    """The checkpoint behaviour of ``AdapterTrainer``, for any ``transformers.Trainer`` subclass (put it first).

    ``class MyTrainer(AdapterCheckpoints, SomeTrainer)`` refuses a model that is not an ``AdaptedModel``, and
    Trainer's FSDP and DeepSpeed options; it reads the label names, and the data columns kept, from the base
    model's ``forward`` (``AdaptedModel.forward`` takes ``*args, **kwargs``, which says nothing); and it saves
    and loads checkpoints as adapter files. ``AdapterTrainer`` is this on ``transformers.Trainer``;
    ``rankshare.sft.AdapterSFTTrainer`` is this on TRL's ``SFTTrainer``.

    Trainer has no public hook for how a checkpoint's model is written and read back, so this overrides its
    private ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` (and ``_set_signature_columns_if_needed``),
    as libraries that save something else than a full model do; checked with transformers 5.24 and TRL 1.16
    (``tests/test_trainer.py``, ``tests/test_trl.py``).
    """

    _plain_trainer = "transformers.Trainer"  # what to use for a model without adapters

    def __init__(self, model: AdaptedModel | None = None, *args, **kwargs) -> None:
        if not isinstance(model, AdaptedModel):
            raise RankshareError(
                f"{type(self).__name__} trains an AdaptedModel (from rankshare.adapt), got {type(model).__name__}; "
                f"use {self._plain_trainer} for other models."
            )
        super().__init__(model, *args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # Checkpoints are written from the main process's tensors, which these engines shard.
            raise RankshareError(
                f"{type(self).__name__} does not support Trainer's FSDP or DeepSpeed options: its checkpoints would "
                "hold shards. Train with DDP (the default under torchrun), or shard yourself with "
                "rankshare.integrations.fully_shard_adapted and save with full_adapter_state_dict."
            )
        # AdaptedModel.forward takes (*args, **kwargs); the base model's signature says what it accepts.
        base_class = type(model.base_model)
        if self.args.label_names is None:
            self.label_names = find_labels(base_class)
        self.can_return_loss = can_return_loss(base_class)
        self.model_accepts_loss_kwargs = getattr(model.base_model, "accepts_loss_kwargs", None)
        if self.model_accepts_loss_kwargs is None:
            parameters = inspect.signature(model.base_model.forward).parameters.values()
            self.model_accepts_loss_kwargs = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = list(inspect.signature(self.model.base_model.forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Trainer passes state_dict only when it gathers a sharded model (DeepSpeed, FSDP); the adapter
        # tensors are read from the model itself.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        self.model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        self.accelerator.unwrap_model(model).load_adapter_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.model.load_adapter_weights(self.state.best_model_checkpoint)


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` for an ``AdaptedModel``: checkpoints hold the adapter, not the base model.

    Trainer saves ``save_pretrained`` output only for its own model classes and otherwise the full state
    dict, base weights included; here every checkpoint (and ``save_model``) holds ``adapter_config.json``
    and ``adapter_model.safetensors``. ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end``
    copy the adapter tensors of a checkpoint into the running model in place.

    The data columns kept and the label names are read from the base model's ``forward``, as Trainer
    would for the base model alone.
    """
