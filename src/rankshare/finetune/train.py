"""One adapter's training: build it, train it with checkpoints, and resume from them.

The data order is a function of the seed and the step, and checkpoints hold the trainable tensors, the
optimiser, the schedule and the random state, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import io
import math
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import rankshare as rs

from ..atomic_files import replace_file
from ..config import AdapterConfig, method_class
from ..errors import RankshareError
from . import distributed
from .data import Example
from .jobs import BASIS_ADAPTER, TASK_ADAPTER
from .objectives import Objective
from .progress import progress

CHECKPOINT = "checkpoint.pt"


@dataclass
class Settings:
    """Everything that decides a run's result: the adapter's config and the schedule.

    ``lr`` None: the fine-tuning command fills it from the method's recipe for the objective
    (``AdapterConfig.recipe``); left None, it is the method's ``AdapterConfig.learning_rate``.
    """

    adapter: dict  # AdapterConfig.to_dict(): method, rank, alpha, target_modules and the method's options
    epochs: int = 1
    max_steps: int | None = None
    lr: float | None = None
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 50

    @property
    def method(self) -> str:
        return self.adapter["method"]

    @property
    def rank(self) -> int:
        return self.adapter["rank"]

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.adapter)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else method_class(self.method).learning_rate


def attach_adapter(model: nn.Module, settings: Settings, heads: list[str], basis: Path | None = None) -> nn.Module:
    """The adapter of ``settings`` on ``model`` (PEFT's LoRA through PEFT itself), drawn from the run's seed.

    With ``basis`` (a saved LoTR adapter's folder) that adapter is loaded first, frozen, as ``BASIS_ADAPTER``;
    the new adapter, whose config names it as its basis, uses its factors and is the one that trains.
    """
    torch.manual_seed(settings.seed)
    if basis is None:
        return rs.adapt(model, settings.adapter_config(), modules_to_save=heads)
    adapted = rs.AdaptedModel(model)
    adapted.load_adapter(basis, BASIS_ADAPTER)
    adapted.add_adapter(TASK_ADAPTER, settings.adapter_config(), modules_to_save=heads)
    adapted.set_adapter(TASK_ADAPTER)
    return adapted


def parameter_counts(model: nn.Module, heads: list[str]) -> dict[str, int]:
    """Trainable parameters of the adapter and of the head, apart."""
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    head_ids = {id(p) for name, module in model.named_modules() if name.split(".")[-1] in heads
                for p in module.parameters()}
    head = sum(p.numel() for i, p in trainable.items() if i in head_ids)
    return {"adapter": sum(p.numel() for p in trainable.values()) - head, "head": head}


def epochs_for(steps: int, batch_size: int, num_examples: int) -> int:
    """The fewest epochs of ``num_examples`` that hold ``steps`` steps of ``batch_size`` (max_steps cuts the rest)."""
    return math.ceil(steps * batch_size / max(1, num_examples))


def batch_order(num_examples: int, settings: Settings) -> list[list[int]]:
    """Every step's example indices: a fresh seeded permutation per epoch, cut at max_steps."""
    steps = []
    for epoch in range(settings.epochs):
        generator = torch.Generator().manual_seed(settings.seed * 10_007 + epoch)
        permutation = torch.randperm(num_examples, generator=generator)
        size = settings.batch_size
        steps += [permutation[i : i + size].tolist() for i in range(0, num_examples, size)]
    # Under a launcher every process needs a share of every batch: a last batch too small to share is dropped.
    steps = [step for step in steps if len(step) >= distributed.size()]
    return steps[: settings.max_steps] if settings.max_steps else steps


def train(model: nn.Module, objective: Objective, examples: list[Example], settings: Settings, device,
          checkpoint_dir: Path, quiet: bool = False, stop_after: int | None = None,
          stop_on_divergence: bool = False) -> dict:
    """Train in place; resumes from ``checkpoint_dir`` if it holds a checkpoint. Returns timing figures.

    A loss that is not finite is an error, or with ``stop_on_divergence`` the end of training: the model stays as
    the last finite step left it, and the figures hold ``diverged_at_step``."""
    order = batch_order(len(examples), settings)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=0.0)
    warmup = max(1, round(0.06 * len(order)))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min((step + 1) / warmup, max(0.0, (len(order) - step) / max(1, len(order) - warmup)))
    )
    start, step_seconds = _resume(model, optimiser, schedule, checkpoint_dir)
    model.train()
    trained = distributed.wrap(model, device)
    bar = progress(len(order), f"train {settings.method}", "steps", quiet or not distributed.is_main(), initial=start)
    diverged = None
    for step in range(start, len(order)):
        tick = time.perf_counter()
        batch = objective.batch([examples[i] for i in distributed.shard(order[step])], device)
        loss = objective.loss(trained, batch)
        value = loss.item()  # one device sync per step, shared by the check and the progress bar
        if not math.isfinite(value):
            if not stop_on_divergence:
                raise RankshareError(f"The loss became {value} at step {step}; lower --lr and try again.")
            diverged = step
            break
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimiser.step()
        schedule.step()
        optimiser.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        bar.set_postfix(loss=f"{value:.4f}")
        bar.update()
        done = step + 1
        if distributed.is_main() and (done % settings.checkpoint_every == 0 or done == len(order)):
            _save_checkpoint(model, optimiser, schedule, done, step_seconds, checkpoint_dir)
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    model.eval()
    figures = {"steps": len(order), "train_seconds": sum(step_seconds),
               "median_step_seconds": statistics.median(step_seconds) if step_seconds else None}
    return figures if diverged is None else {**figures, "diverged_at_step": diverged}


def _trainable_state(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(model, optimiser, schedule, step, step_seconds, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "trainable": {k: v.detach().cpu() for k, v in _trainable_state(model).items()},
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "step_seconds": torch.tensor(step_seconds, dtype=torch.float64),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    replace_file(directory / CHECKPOINT, buffer.getvalue())


def _resume(model, optimiser, schedule, directory: Path) -> tuple[int, list[float]]:
    path = directory / CHECKPOINT
    if not path.is_file():
        return 0, []
    state = torch.load(path, weights_only=True)  # tensors and numbers only: no code is unpickled
    params = _trainable_state(model)
    if set(state["trainable"]) != set(params):
        raise RankshareError(f"{path} does not match this run's adapter; start a new run with another --out.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    optimiser.load_state_dict(state["optimiser"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng"):  # dropout on a GPU draws from the GPU's generator
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["step_seconds"].tolist()


def peak_memory_mb(device) -> float:
    """Peak memory: CUDA's allocator peak on a GPU; on CPU the process's peak resident set (all it ran)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {"rankshare": rs.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": str(torch.get_num_threads())}
