# The set-up commands of the README:
#   make smoke   create .venv as make train does, then a run that ends in about half a minute on a laptop CPU
#                (configs/smoke.yaml: synthetic images, a small CNN, 3 epochs, a run folder with its plots)
#   make train   create .venv, install fasttrain and its runtime dependencies (torch, torchvision, ...; no
#                extras), train CIFAR10_CNN on CIFAR-10 (configs/cifar10_cnn.yaml)
#   make test    create .venv, install fasttrain[dev,dali] (what the test suite needs: pytest, accelerate,
#                DALI's CUDA 13 build, which the tests run on the CPU), run the whole test suite
#   make test-fast  the same without the tests marked slow (whole trainings, benchmarks, multi-process runs):
#                a few minutes, for the edit-test loop; `make test` before a commit
# Variables: PYTHON (interpreter that makes the venv), EXTRAS (extras `make train` adds, comma-separated:
# dali-cuda12, dali-cuda13, tensorboard, dev; e.g. `make train EXTRAS=dali-cuda12`), TORCH_INDEX (a pip index
# that torch and torchvision come from when the venv is made, e.g. https://download.pytorch.org/whl/cpu for
# the CPU build, a tenth of the size; default: PyPI's, CUDA included on Linux), DATA_ROOT (folder holding
# cifar-10-batches-py/; downloaded there when missing), ARGS (extra key.sub=value overrides for `make train`),
# PYTEST_ARGS (pytest options of `make test`; PYTEST_ARGS= runs the suite in one process).

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?=
TORCH_INDEX ?=
DATA_ROOT ?= ./data
ARGS ?=
# two test processes (a CI machine has 2 cores); each module stays on one, so its shared runs are made once;
# modules are taken longest first (tests/conftest.py, LONGEST_FIRST), not in xdist's order by number of tests;
# a process that dies is not replaced: its test is reported by name (a replacement re-ran it, and xdist's
# loadscope scheduler could end the session in INTERNALERROR KeyError instead)
PYTEST_ARGS ?= -n 2 --dist loadscope --no-loadscope-reorder --max-worker-restart=0 --durations=15
BIN := $(VENV)/bin
comma := ,
# one stamp per set of extras: `make train EXTRAS=...` installs them even where a plain `make train` ran.
# The test suite's stamp keeps the name .installed (the venvs made before `make train` lost its extras).
TRAIN_STAMP := $(BIN)/.installed-train$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS)))
TEST_STAMP := $(BIN)/.installed

.PHONY: smoke train test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))

$(TRAIN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.$(if $(EXTRAS),[$(EXTRAS)])'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,dali]'
	touch $@

smoke: $(TRAIN_STAMP)
	$(BIN)/python -m fasttrain.run --config configs/smoke.yaml output.name=smoke output.overwrite=true $(ARGS)

train: $(TRAIN_STAMP)
	$(BIN)/python -m fasttrain.run --config configs/cifar10_cnn.yaml data.root=$(DATA_ROOT) $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests benchmarks

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) -m "not slow" tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
