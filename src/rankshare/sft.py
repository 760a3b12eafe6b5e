"""TRL's ``SFTTrainer`` for a rankshare ``AdaptedModel``: supervised fine-tuning whose checkpoints are adapter files.

``AdapterSFTTrainer`` is ``trl.SFTTrainer`` with the checkpoint behaviour of ``rankshare.integrations.AdapterTrainer``
(the mixin ``AdapterCheckpoints``): every checkpoint, and ``save_model``, holds ``adapter_config.json`` and
``adapter_model.safetensors`` instead of the base model, and ``train(resume_from_checkpoint=...)`` copies a
checkpoint's adapter tensors back into the running model, so a resumed run continues exactly. TRL's datasets work
as with a plain model: "text", "prompt"/"completion" (loss on the completion only, TRL's default) and "messages"
(the tokenizer's chat template). Needs the ``trl`` extra: ``pip install "rankshare[trl]"``.

Usage::

    import rankshare as rs
    from rankshare.sft import AdapterSFTTrainer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    base = AutoModelForCausalLM.from_pretrained("my-llama")
    model = rs.adapt(base, rs.LotrConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    args = SFTConfig(output_dir="runs/sft", max_steps=1000, save_steps=200, learning_rate=1e-3)
    trainer = AdapterSFTTrainer(model=model, args=args, train_dataset=dataset,  # e.g. "prompt"/"completion"
                                processing_class=AutoTokenizer.from_pretrained("my-llama"))
    trainer.train()  # later: trainer.train(resume_from_checkpoint="runs/sft/checkpoint-400")

The model is adapted already, so a ``peft_config`` is refused. What TRL is given differs from a plain model in
two places: TRL puts its fused LM head (log-probabilities computed in chunks, without the full logits) on the
model it trains, and here that is the base model inside the ``AdaptedModel`` (whose ``base_model`` is the whole
causal LM, not the backbone TRL means by that name); and the data columns kept are TRL's own, not read from
the model's ``forward``. Tested with TRL 1.16.
"""

from __future__ import annotations

import inspect
import os

try:
    import trl
    from trl.trainer import add_fused_lm_head
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('rankshare.sft needs TRL 1.16: pip install "rankshare[trl]"') from error

from .errors import RankshareError
from .integrations import AdapterCheckpoints
from .model import AdaptedModel
from .slots import AdaptedLinear

__all__ = ["AdapterSFTTrainer"]

# What SFTTrainer.compute_loss reads from the fused LM head's output (TRL 1.16).
_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


class AdapterSFTTrainer(AdapterCheckpoints, trl.SFTTrainer):
    """``trl.SFTTrainer`` for an ``AdaptedModel``: checkpoints hold the adapter, and resuming restores it.

    Takes SFTTrainer's arguments, with an ``AdaptedModel`` as ``model`` and a tokenizer (or processor) as
    ``processing_class`` unless the base model was loaded from a folder or model id that has one. ``peft_config``
    is refused: the model already holds its adapters.
    """

    _plain_trainer = "trl.SFTTrainer"
    # TRL's own choice of columns (its tokenized input_ids, labels and packing lengths), not the base model's forward.
    _set_signature_columns_if_needed = trl.SFTTrainer._set_signature_columns_if_needed

    def __init__(self, model: AdaptedModel | None = None, *args, **kwargs) -> None:
        given = inspect.signature(trl.SFTTrainer.__init__).bind_partial(None, model, *args, **kwargs).arguments
        if given.get("peft_config") is not None:
            raise RankshareError(
                "AdapterSFTTrainer trains the adapters the AdaptedModel already has; it takes no peft_config. Adapt "
                "the base model with rankshare.adapt (or give trl.SFTTrainer a plain model and a peft_config)."
            )
        own_forward = None
        if isinstance(model, AdaptedModel):
            _check_model(model, given)
            own_forward = vars(model).get("forward")  # an instance-level forward someone set before, if any
        super().__init__(model, *args, **kwargs)
        self._move_fused_lm_head(own_forward)

    def _move_fused_lm_head(self, own_forward) -> None:
        """Move TRL's fused LM head from the ``AdaptedModel`` to its base model.

        SFTTrainer's ``__init__`` replaces ``model.forward`` with one that, given ``fused_lm_head=True``, runs
        ``model.base_model`` as the backbone (a PreTrainedModel's name for its transformer without the head) and
        projects its hidden states through ``model.get_output_embeddings()``. On an ``AdaptedModel``,
        ``base_model`` is the whole causal LM, whose output has no hidden states; so the model gets its own
        forward back and the head goes on the causal LM, to which ``AdaptedModel.forward`` passes
        ``fused_lm_head``; the adapters inside its backbone run as usual.
        """
        model = self.model
        if vars(model).get("forward") is own_forward:  # SFTTrainer did not patch it
            return
        if own_forward is None:
            del model.forward  # AdaptedModel.forward again
        else:
            model.forward = own_forward
        add_fused_lm_head(model.base_model, outputs=_FUSED_OUTPUTS)


def _check_model(model: AdaptedModel, given: dict) -> None:
    base = model.base_model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, AdaptedLinear):
        raise RankshareError(
            "The LM head is an adapted module, but SFTTrainer computes the log-probabilities from the head's weight "
            "directly, so its adapter would never run. Leave the LM head out of target_modules (put it in "
            "modules_to_save to train it whole)."
        )
    if given.get("processing_class") is None and not getattr(getattr(base, "config", None), "_name_or_path", ""):
        raise RankshareError(
            "SFTTrainer loads the tokenizer from the folder or model id the base model was loaded from, and this one "
            "was built from a config; pass processing_class=<its tokenizer>."
        )
    path = getattr(given.get("args"), "chat_template_path", None)
    if path is not None and not (os.path.isfile(path) and str(path).endswith((".jinja", ".j2"))):
        raise RankshareError(
            f"chat_template_path={path!r} would make SFTTrainer clone another model's chat template, which adds "
            "tokens and resizes the base model's embeddings after adaptation: the new rows would stay frozen and "
            "out of the adapter files. Set processing_class.chat_template, or give a .jinja file."
        )
