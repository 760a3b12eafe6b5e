"""Evaluating a model on a run's splits: each split's scores, and how a mixture's routers spread the tokens.

Evaluation is sharded over a launcher's processes, whose raw tallies are pooled before the metrics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..mixture import MixtureLayer
from ..model import AdaptedModel
from ..slots import AdaptedLinear
from . import distributed
from .data import DataSplits
from .objectives import Objective
from .progress import progress


def layer_average(layer_means: dict[str, list[list[float]]]) -> dict[str, list[float]]:
    """Per task, the mean gate per expert averaged over layers."""
    return {task: torch.tensor(layers).mean(0).tolist() for task, layers in layer_means.items()}


class RouterTracker:
    """Mean gate per expert for each task and layer, over the tokens of the examples (padding excluded).

    Each layer has its own router, so expert i of one layer has nothing to do with expert i of another:
    ``layer_means`` keeps them apart (``names`` gives each layer's module name; ``merge --gates TASK`` uses them);
    ``means`` averages over layers (a summary).
    """

    def __init__(self, model: nn.Module) -> None:
        # The hooks go on the slots that hold the routers: a slot calls its active adapter's methods directly.
        modules = (model.base_model if isinstance(model, AdaptedModel) else model).named_modules()
        routed = [(name, m) for name, m in modules if isinstance(m, AdaptedLinear)
                  and isinstance(m.adapters[m.active] if m.active in m.adapters else None, MixtureLayer)]
        self.names = [name for name, _ in routed]
        self.layers = [m for _, m in routed]
        self.sums: dict[str, torch.Tensor] = {}  # task -> (layers, N)
        self.counts: dict[str, float] = {}  # task -> tokens seen by each layer
        self.current: tuple[torch.Tensor, list[str]] | None = None
        self.index = {id(layer): i for i, layer in enumerate(self.layers)}
        self.handles = [layer.register_forward_pre_hook(self._record) for layer in self.layers]

    def observe(self, attention_mask: torch.Tensor | None, tasks: list[str]) -> None:
        """The next forwards are of these examples; None: of none to record (e.g. generation)."""
        self.current = None if attention_mask is None else (attention_mask.float(), tasks)

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def _record(self, layer, args) -> None:
        if self.current is None:
            return
        mask, tasks = self.current
        gates = layer.adapters[layer.active].router_probs(args[0]).detach()  # (B, T, N)
        weighted = (gates * mask.unsqueeze(-1)).sum(1).cpu()  # (B, N)
        i = self.index[id(layer)]
        for row, task in enumerate(tasks):
            if task not in self.sums:
                self.sums[task] = torch.zeros(len(self.layers), weighted.shape[-1])
                self.counts[task] = 0.0
            self.sums[task][i] += weighted[row]
            if i == 0:  # every layer sees the same tokens
                self.counts[task] += mask[row].sum().item()

    def layer_means(self) -> dict[str, list[list[float]]]:
        """Per task, each layer's mean gate per expert; pooled over all processes when launched in parallel."""
        sums, counts = {}, {}
        for process_sums, process_counts in distributed.gather((self.sums, self.counts)):
            for task in process_sums:
                sums[task] = sums.get(task, 0) + process_sums[task]
                counts[task] = counts.get(task, 0) + process_counts[task]
        return {task: (sums[task] / counts[task]).tolist() for task in sorted(sums)}

    def means(self) -> dict[str, list[float]]:
        return layer_average(self.layer_means())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def evaluate(model, objective: Objective, splits: DataSplits, batch_size: int, device, quiet: bool,
             names: tuple[str, ...] = ("validation", "test")) -> dict:
    """Scores on each split in ``names``; for mixtures also the routing on the last of them (mean gates,
    averaged over layers in "router", per layer in "router_layers", in the order of the modules "router_modules"
    names)."""
    model.eval()
    tracker = RouterTracker(model)
    results = {}
    objective.observer = tracker.observe
    try:
        for split in names:
            tracker.reset()  # the routing recorded is the last split's alone
            examples = distributed.shard(getattr(splits, split))
            with progress(len(examples), f"eval {split}", "examples", quiet or not distributed.is_main()) as bar:
                tally = objective.tally(model, examples, batch_size, device, progress=bar.update)
            results[split] = objective.summarize(distributed.gather(tally))
    finally:
        objective.observer = None
        tracker.close()
    if not tracker.layers:
        return {"metrics": results, "router": None}
    layer_means = tracker.layer_means()  # gathered from every process once
    return {"metrics": results, "router": layer_average(layer_means), "router_layers": layer_means,
            "router_modules": tracker.names}
