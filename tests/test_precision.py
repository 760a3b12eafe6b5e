"""Precision and memory for real LLMs: a bfloat16 or float16 base with float32 adapters, and gradient checkpointing.

A base loaded in a low-precision dtype stays in it; every adapter tensor is float32, the update ``s · ΔW x`` is
computed in float32 and cast to the base's dtype before it joins the base layer's output. Merging rounds once:
``W ← (W.float() + s · ΔW).to(W.dtype)``. Gradient checkpointing recomputes each block, adapters included, in
the backward pass, and must give the same loss and gradients as no checkpointing.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters, run
from rankshare.layer import dense_weight

LOW = [torch.bfloat16, torch.float16]
MIXTURES = ("mor", "moelora")


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of ``x``'s dtype at each element (one unit in the last place), as float32.

    For |x| in [2^(e-1), 2^e) it is ``eps · 2^(e-1)``; below the normal range (and at zero) the subnormal spacing.
    """
    info = torch.finfo(x.dtype)
    values = x.float()
    _, exponent = torch.frexp(values)
    subnormal = info.smallest_normal * info.eps
    return torch.ldexp(torch.full_like(values, info.eps), exponent - 1).clamp_min(subnormal).masked_fill(
        values == 0, subnormal)


@torch.no_grad()
def _reference_update(layer: rs.AdapterLayer, gates: torch.Tensor | None) -> torch.Tensor:
    """``s · ΔW`` (d_out, d_in) in float64 from the adapter's own tensors, by each method's equation (METHODS.md)."""
    s = layer.scale
    if isinstance(layer, rs.LotrLayer):  # s · U G_l Vᵀ
        u, g, v = (t.double() for t in (layer.group.left, layer.core, layer.group.right))
        return s * u @ g @ v.T
    gates = gates.double()
    if isinstance(layer, rs.MorLayer):  # s Σ_i γ_i diag(b_i) B diag(a_i) A
        a, b, a_scale, b_scale = (t.double() for t in (layer.lora_A, layer.lora_B, layer.scale_in, layer.scale_out))
        return s * sum(gates[i] * b_scale[i, :, None] * b @ (a_scale[i, :, None] * a) for i in range(len(gates)))
    if isinstance(layer, rs.MoeLoraLayer):  # s Σ_i γ_i B_i A_i
        a, b = layer.lora_A.double(), layer.lora_B.double()
        return s * sum(gates[i] * b[i] @ a[i] for i in range(len(gates)))
    raise AssertionError(type(layer))


def _constant_gates(model: rs.AdaptedModel, method: str) -> list[float] | None:
    """For a mixture: a zero router, so every token's gates are 1/N and the fixed-gate merge is the same model."""
    if method not in MIXTURES:
        return None
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.router.zero_()
    return [1 / 3] * 3


def _adapter_tensors(model: rs.AdaptedModel) -> dict[str, torch.Tensor]:
    """The adapter's own tensors: its layers' and the shared factors (LoTR's U, V), not modules saved whole."""
    return {key: t for key, t in model.adapter_state_dict().items() if not key.startswith(tuple(model.modules_to_save))}


# -- a low-precision base ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family_name", ["llama", "gpt2", "bert"])
def test_low_precision_base_keeps_float32_adapters(family_name, method, dtype):
    family = FAMILIES[family_name]
    model = rs.adapt(base_model(family).to(dtype), METHODS[method](family.targets),
                     modules_to_save=family.modules_to_save)
    # The copies of modules saved whole (BERT's classifier) are the base's own modules, copied: they keep its
    # dtype, as PEFT's modules_to_save do. Only the adapter's tensors are rankshare's to make.
    tensors = _adapter_tensors(model)
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    if method.startswith("lotr"):
        assert any(key.startswith("shared.") for key in tensors)  # U and V are among them
    assert all(p.dtype == dtype for p in model.base_model.parameters() if not p.requires_grad)
    randomise_adapters(model)  # B = 0 at init would make the update trivially zero

    # Each adapted layer: base_layer(x) in the base dtype, plus s · ΔW x computed in float32 and cast to it.
    seen, handles = [], []
    for name, layer in model.adapter_layers().items():
        host = model.base_model.get_submodule(name)
        forward = layer.adapter_forward

        def recording(x, forward=forward):
            out = forward(x)
            seen.append((x.dtype, out.dtype))
            return out

        layer.adapter_forward = recording

        def check(module, args, output, forward=forward):
            x = args[0]
            assert output.dtype == dtype
            assert torch.equal(output, module.base_layer(x) + forward(x.float()).to(dtype))

        handles.append(host.register_forward_hook(check))
    with torch.no_grad():
        out = run(model, family.inputs())
    for handle in handles:
        handle.remove()
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT reads the old name
def test_peft_lora_on_a_bf16_base_keeps_float32_adapters():
    """PEFT's LoRA (the baseline) casts its adapter weights to float32 (get_peft_model's autocast_adapter_dtype)."""
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family).to(torch.bfloat16), rs.PeftLoraConfig(rank=4, alpha=8,
                                                                               target_modules=family.targets))
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}
    with torch.no_grad():
        out = run(model, family.inputs())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["lotr", "mor", "moelora"])  # lotr_by_shape trains through the same code
def test_bf16_base_trains(method):
    """AdamW on float32 adapters over a frozen bfloat16 LLaMA lowers the loss on a fixed batch."""
    family = FAMILIES["llama"]
    model = rs.adapt(base_model(family).to(torch.bfloat16), METHODS[method](family.targets)).train()
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses  # observed: 3.95 -> 3.5 to 3.7
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family_name", ["llama", "gpt2"])
def test_low_precision_merge_rounds_once(family_name, method, dtype):
    """``merge_and_unload`` gives ``W ← (W.float() + s·ΔW).to(dtype)``; ``unmerge`` gives W back to one ulp.

    Weights: the library forms ΔW in float32, the reference here in float64, so they can round to neighbouring
    values only where the exact sum lies at a rounding boundary: within one ulp everywhere, equal almost
    everywhere (observed: 99.9 % or more; rounding ΔW to the base dtype before adding, as a plain
    ``W + ΔW.to(W.dtype)`` does, missed by up to 255 ulps where ΔW cancels W, and matched only 70 to 76 %).
    Outputs (eps: the dtype's machine epsilon): the unmerged low-precision model differs from the same weights
    computed in float32 by about one eps times the output scale (observed up to 1.15 eps), and the merged one,
    whose weights carry one more rounding each, likewise; so they agree to 2 eps · max|output| (observed: up to
    1.4 eps), while the adapter moves the outputs by 40 eps or more.
    """
    family = FAMILIES[family_name]
    model = rs.adapt(base_model(family).to(dtype), METHODS[method](family.targets))
    randomise_adapters(model, std=0.05)
    gates = _constant_gates(model, method)
    inputs = family.inputs()
    with torch.no_grad():
        unmerged = run(model, inputs).float()
        with model.disable_adapter():
            base_out = run(model, inputs).float()
    tolerance = 2 * torch.finfo(dtype).eps * unmerged.abs().max()
    assert (unmerged - base_out).abs().max() > 5 * tolerance  # the comparison below is not trivial

    layers = model.adapter_layers()
    originals = {name: dense_weight(layer.base_layer).clone() for name, layer in layers.items()}
    gate_tensor = None if gates is None else torch.tensor(gates)
    expected = {name: (originals[name].double() + _reference_update(layer, gate_tensor)).to(dtype)
                for name, layer in layers.items()}

    # unmerge, on a copy: the merge rounded W + s·ΔW to the base dtype, so subtracting s·ΔW again (in float32,
    # rounded once) misses W by at most twice the merge's rounding error: one ulp of the merged weight.
    twin = copy.deepcopy(model)
    twin.merge(gates=gates)
    twin_layers = twin.adapter_layers()
    merged = {name: dense_weight(layer.base_layer).clone() for name, layer in twin_layers.items()}
    twin.unmerge()
    for name, layer in twin_layers.items():
        restored = dense_weight(layer.base_layer)
        assert restored.dtype == dtype
        assert ((restored.float() - originals[name].float()).abs() <= _ulp(merged[name])).all()
    with torch.no_grad():
        assert (run(twin, inputs).float() - unmerged).abs().max() <= tolerance

    plain = model.merge_and_unload(gates=gates)
    exact, total = 0, 0
    for name, weight in expected.items():
        merged = dense_weight(plain.get_submodule(name))
        assert merged.dtype == dtype
        error = (merged.float() - weight.float()).abs()
        assert (error <= _ulp(weight)).all()
        exact, total = exact + int((error == 0).sum()), total + error.numel()
    assert exact >= 0.99 * total, f"only {exact} of {total} merged weights are the once-rounded sum"
    with torch.no_grad():
        assert (run(plain, inputs).float() - unmerged).abs().max() <= tolerance


# -- gradient checkpointing ---------------------------------------------------------------------------------------


def _llama() -> torch.nn.Module:
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32, attention_dropout=0.0)
    return LlamaForCausalLM(config)


def _gpt2() -> torch.nn.Module:
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # dropout off: the two runs draw no random numbers
    return GPT2LMHeadModel(config)


CAUSAL = {"llama": (_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (_gpt2, ["c_attn", "c_proj"])}


def _loss_and_grads(model: rs.AdaptedModel) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, int]:
    """One training step's loss and every trainable parameter's gradient, and the adapters' forward calls in the
    forward and the backward pass (a checkpointed block runs its adapters again in the backward pass)."""
    calls = []
    for layer in model.adapter_layers().values():
        forward = layer.adapter_forward
        layer.adapter_forward = lambda x, forward=forward: calls.append(1) or forward(x)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    model.train()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    in_forward = len(calls)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, in_forward, len(calls) - in_forward


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_checkpointing_gives_the_same_loss_and_gradients(arch, method):
    """Checkpointing three ways: the base model's own method called before adapting (non-reentrant, as a
    training job enables it), and ``AdaptedModel.gradient_checkpointing_enable`` non-reentrant (its default) and
    reentrant. Every trainable tensor (LoTR's shared U, V, MoR's router included) gets the gradient it gets
    without checkpointing, to float32 rounding (observed: bit for bit)."""
    build, targets = CAUSAL[arch]
    torch.manual_seed(0)
    base = build()
    config = METHODS[method](targets)
    reference = rs.adapt(copy.deepcopy(base), config)
    randomise_adapters(reference)  # away from B = 0, where A's gradient would be zero in both runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5 renamed it activation_checkpointing_enable
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = {"base": rs.adapt(base, config)}
    checkpointed["base"].load_state_dict(reference.state_dict())
    for mode, kwargs in [("non_reentrant", None), ("reentrant", {"use_reentrant": True})]:
        checkpointed[mode] = copy.deepcopy(reference)
        checkpointed[mode].gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    loss, grads, forward_calls, backward_calls = _loss_and_grads(reference)
    assert backward_calls == 0
    if method.startswith("lotr"):
        assert any(name.startswith("shared.") for name in grads)
    assert all(grad is not None and grad.abs().max() > 0 for grad in grads.values())
    for mode, model in checkpointed.items():
        ckpt_loss, ckpt_grads, ckpt_forward_calls, ckpt_backward_calls = _loss_and_grads(model)
        assert ckpt_forward_calls == forward_calls == ckpt_backward_calls, mode  # the blocks were recomputed
        assert (ckpt_loss - loss).abs() <= 1e-6 * loss.abs(), (mode, ckpt_loss, loss)
        assert ckpt_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert ckpt_grads[name] is not None, f"{mode}: {name} got no gradient under checkpointing"
            torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=1e-6 * grad.abs().max(),
                                       msg=lambda m, mode=mode, name=name: f"{mode}, {name}: {m}")


def test_reentrant_checkpointing_needs_inputs_that_require_grad():
    """Why ``gradient_checkpointing_enable`` hooks the embeddings for reentrant checkpointing: without it no block
    input requires grad (the base is frozen), so no gradient reaches any adapter inside a block."""
    build, targets = CAUSAL["llama"]
    torch.manual_seed(0)
    model = rs.adapt(build(), METHODS["lotr"](targets))
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.base_model.disable_input_require_grads()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "None of the inputs have requires_grad=True"
        loss = model.train()(input_ids=ids, labels=ids, use_cache=False).loss
    assert not loss.requires_grad  # the adapters' gradients are lost


def test_checkpointing_needs_a_transformers_model():
    model = rs.adapt(base_model(FAMILIES["mlp"]), METHODS["lotr"](["0"]))
    with pytest.raises(rs.RankshareError, match="no gradient checkpointing"):
        model.gradient_checkpointing_enable()
