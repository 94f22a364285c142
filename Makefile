# The two set-up commands of the README:
#   make train   create .venv, install fasttrain, train CIFAR10_CNN on CIFAR-10 (configs/cifar10_cnn.yaml)
#   make test    create .venv, install fasttrain[dev], run the whole test suite
# Variables: PYTHON (interpreter that makes the venv), DATA_ROOT (folder holding cifar-10-batches-py/;
# downloaded there when missing), ARGS (extra key.sub=value overrides for `make train`), PYTEST_ARGS
# (pytest options of `make test`; PYTEST_ARGS= runs the suite in one process).

PYTHON ?= python3
VENV ?= .venv
DATA_ROOT ?= ./data
ARGS ?=
# two test processes (a CI machine has 2 cores); each module stays on one, so its shared runs are made once
PYTEST_ARGS ?= -n 2 --dist loadscope --durations=15
BIN := $(VENV)/bin

.PHONY: train test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,dali]'
	touch $@

train: $(BIN)/.installed
	$(BIN)/python -m fasttrain.run --config configs/cifar10_cnn.yaml data.root=$(DATA_ROOT) $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
