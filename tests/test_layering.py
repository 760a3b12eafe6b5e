"""The import graph of rankshare is a stack: no module imports one above it, at the top of a file or inside a function.

From the bottom: the methods and what they stand on, the adapter files, the model's file methods
(``pretrained.AdapterFiles``: save_pretrained, load_adapter, from_pretrained) and checkpointing, the model surgery,
the package and its integrations, fine-tuning,
the benchmark and the study, the command line.

Fine-tuning is a stack of its own: data and models, objectives, a job's description and evaluation, then a
trained run loaded and used (converted, predicting, generating), and training last: nothing that loads a run
imports the code that trains one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "rankshare"

LAYERS = [
    {"errors", "version", "atomic_files"},
    {"config", "layer", "slots", "targets", "mixture", "lotr", "mor", "moelora", "peft_lora"},  # the methods
    {"persistence"},  # adapter files, knowing no model
    {"pretrained", "checkpointing"},  # a model's adapters to and from files; checkpointing a frozen base
    {"model"},  # surgery
    {"__init__", "integrations", "sft", "export", "compress"},
    {"finetune"},
    {"bench", "study"},
    {"cli"},
]

FINETUNE = [
    {"__init__", "examples", "metrics", "progress", "distributed", "budget", "report", "data_files", "models",
     "run_folder"},
    {"instructions", "skills"},  # instruction files; the generated instruction set
    {"data"},
    {"objectives"},
    {"evaluation", "jobs"},
    {"trained"},  # a run loaded back
    {"convert", "predict"},
    {"generate"},
    {"train"},  # one adapter's training loop
    {"running"},  # a job's methods trained, evaluated and saved
]
TRAINING = {"rankshare.finetune.train", "rankshare.finetune.running"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every rankshare module ``path`` imports, wherever in the file the import stands."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "rankshare"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "rankshare":
                continue
            for alias in node.names:  # ``from . import persistence`` imports a module, not the package's names
                submodule = f"{target}.{alias.name}"
                is_module = (SOURCE.parent / submodule.replace(".", "/")).with_suffix(".py").is_file()
                found.add(submodule if is_module else target)
    return found


def layer_of(module: str) -> tuple[int, int]:
    """The module's layer, and within fine-tuning its layer there (0 elsewhere)."""
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if key in names:
            return index, finetune_layer_of(module) if key == "finetune" else 0
    raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def finetune_layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[2] if len(parts) > 2 else "__init__"
    for index, names in enumerate(FINETUNE):
        if key in names:
            return index
    raise AssertionError(f"{module} is in no layer of fine-tuning; add it to FINETUNE")


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_one_above_it(module):
    above = sorted(t for t in imported(MODULES[module]) if layer_of(t) > layer_of(module))
    assert not above, f"{module} (layer {layer_of(module)}) imports {above}"


def test_no_import_cycle():
    graph = {m: {t for t in imported(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # A package's __init__ is imported before its modules; an edge to a parent package is not a cycle of code.
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [module, target])}"
            if target not in state:
                visit(target, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def reachable(module: str) -> set[str]:
    """Every rankshare module that importing ``module`` may import, through any chain of imports."""
    found, todo = set(), [module]
    while todo:
        for target in imported(MODULES[todo.pop()]):
            if target in MODULES and target not in found:
                found.add(target)
                todo.append(target)
    return found


@pytest.mark.parametrize("module", ["rankshare.finetune.trained", "rankshare.finetune.convert",
                                    "rankshare.finetune.predict", "rankshare.finetune.generate"])
def test_loading_a_run_imports_no_training_code(module):
    assert not reachable(module) & TRAINING, f"{module} imports {sorted(reachable(module) & TRAINING)}"
