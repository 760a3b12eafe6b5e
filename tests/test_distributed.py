"""Two CPU processes (gloo) train as one: DDP and FSDP2 steps on half batches equal one process's on the whole.

The test launches this file under torchrun once; each rank trains every (wrapper, method) case and writes
its gathered adapter tensors, and the tests compare them with the same steps taken here in one process.
LoTR's U and V receive the gradients of all layers of their group, so they are the tensors at stake.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn
from transformers.models.bert.modeling_bert import BertLayer

import rankshare as rs
from conftest import FAMILIES, METHODS, base_model, randomise_adapters
from rankshare.integrations import check_fsdp_sharding, full_adapter_state_dict, fully_shard_adapted

BERT = FAMILIES["bert"]
WORLD_SIZE, BATCH, STEPS = 2, 4, 3
# The dense layers, not only query and value: their gradients move the shared factors far beyond the tolerance.
TARGETS = ["query", "value", "dense"]
CASES = [(wrapper, method) for wrapper in ("ddp", "fsdp") for method in ("lotr", "mor")]


def adapted_bert(method: str) -> rs.AdaptedModel:
    base = base_model(BERT)
    # Dropout masks drawn per process could never match the single process's. transformers 4.x's BERT attention
    # keeps its own rate (dropout_prob) beside its nn.Dropout.
    for module in base.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    torch.manual_seed(1)
    model = rs.adapt(base, METHODS[method](TARGETS), modules_to_save=BERT.modules_to_save)
    # Away from the init, where LoTR's cores are zero and so are the gradients of U and V.
    randomise_adapters(model)
    return model.train()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 50, (BATCH, 6), generator=generator), torch.randint(0, 3, (BATCH,), generator=generator))
            for _ in range(STEPS)]


def train(model: nn.Module, rank: int = 0, world_size: int = 1) -> None:
    """STEPS optimiser steps; each rank takes its slice of every global batch, and the mean loss over it."""
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    share = BATCH // world_size
    for input_ids, labels in batches():
        mine = slice(rank * share, (rank + 1) * share)
        model(input_ids=input_ids[mine], labels=labels[mine]).loss.backward()
        optimiser.step()
        optimiser.zero_grad()


def make_contiguous(model: nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.contiguous()


def refusal(wrap) -> str | None:
    """The message check_fsdp_sharding gives for a LoTR model wrapped by ``wrap``."""
    from torch.distributed.fsdp import fully_shard

    model = adapted_bert("lotr")
    make_contiguous(model)
    for module in model.modules():
        if isinstance(module, BertLayer):
            fully_shard(module)
    wrap(model, fully_shard)
    try:
        check_fsdp_sharding(model)
    except rs.RankshareError as error:
        return str(error)
    return None


def worker(out_dir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for wrapper, method in CASES:
        model = adapted_bert(method)
        if wrapper == "ddp":
            train(DistributedDataParallel(model), rank, dist.get_world_size())
        else:
            train(fully_shard_adapted(model, (BertLayer,)), rank, dist.get_world_size())
        tensors = {key: t.detach().contiguous() for key, t in full_adapter_state_dict(model).items()}
        safetensors.torch.save_file(tensors, out_dir / f"{wrapper}-{method}-rank{rank}.safetensors")

    def shard_groups_alone(model, fully_shard):
        for group in model.shared["default"].values():
            fully_shard(group)
        fully_shard(model)

    refusals = {
        "groups_alone": refusal(shard_groups_alone),
        "no_root": refusal(lambda model, fully_shard: None),
    }
    if rank == 0:
        (out_dir / "refusals.json").write_text(json.dumps(refusals))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
               __file__, str(out_dir)]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return out_dir


def rank_tensors(out_dir: Path, wrapper: str, method: str) -> list[dict[str, torch.Tensor]]:
    return [safetensors.torch.load_file(out_dir / f"{wrapper}-{method}-rank{rank}.safetensors")
            for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("wrapper, method", CASES)
def test_two_ranks_on_half_batches_match_one_process_on_the_whole(distributed_run, wrapper, method):
    single = adapted_bert(method)
    initial = {key: t.detach().clone() for key, t in single.adapter_state_dict().items()}
    train(single)
    expected = single.adapter_state_dict()

    for found in rank_tensors(distributed_run, wrapper, method):
        assert found.keys() == expected.keys()
        for key, tensor in expected.items():
            torch.testing.assert_close(found[key], tensor.detach(), rtol=1e-4, atol=1e-5, msg=key)
    # The steps moved the adapter, LoTR's shared factors included, far beyond that tolerance.
    moved = {key: (tensor - initial[key]).abs().max().item() for key, tensor in expected.items()}
    assert max(moved.values()) > 1e-2
    assert all(change > 1e-3 for key, change in moved.items() if key.startswith("shared.")), moved


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_every_rank_ends_with_the_same_shared_factors(distributed_run, wrapper):
    first, second = rank_tensors(distributed_run, wrapper, "lotr")
    shared = [key for key in first if key.startswith("shared.")]
    assert {key.rsplit(".", 1)[1] for key in shared} == {"left", "right"}
    for key in shared:
        assert torch.equal(first[key], second[key]), key


def test_fsdp_wrappings_that_split_shared_factors_from_their_layers_are_refused(distributed_run):
    refusals = json.loads((distributed_run / "refusals.json").read_text())
    assert "unit of their own" in refusals["groups_alone"]
    assert "belong to no FSDP unit" in refusals["no_root"]


def test_fully_shard_adapted_names_block_types_that_match_nothing():
    with pytest.raises(rs.RankshareError, match="No module of the model is a LSTM"):
        fully_shard_adapted(adapted_bert("lotr"), (nn.LSTM,))
    with pytest.raises(rs.RankshareError, match="needs an AdaptedModel"):
        fully_shard_adapted(base_model(BERT), (BertLayer,))


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
