"""What config values may be: the closed sets of names, the numbers' upper bounds (each with why), and
model.name's two import forms.

The open sets of names (models, datasets, optimizers, schedules) are the registries (registry.py); the
sections (schema.py) declare which of these each key takes.
"""

from __future__ import annotations

import re
import sys

from fasttrain.config.fields import choices, require
from fasttrain.config.registry import MODELS
from fasttrain.errors import ConfigError

# the closed sets: a key of one of these types takes only its names (see fields.Choice)
LoaderName = choices("LoaderName", ("plain", "gpu", "dali", "auto"))
PrecisionName = choices("PrecisionName", ("fp32", "bf16", "fp16"))
CompileMode = choices("CompileMode", ("off", "default", "reduce-overhead", "max-autotune"))
BackendName = choices("BackendName", ("auto", "nccl", "gloo"))
SignalName = choices("SignalName", ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT"))
TtaName = choices("TtaName", ("none", "flip", "flip_shift"))
LossReduction = choices("LossReduction", ("mean", "sum"))
PaddingMode = choices("PaddingMode", ("zeros", "reflect"))
LookaheadEnd = choices("LookaheadEnd", ("fast", "slow", "epoch"))
BnBiasScope = choices("BnBiasScope", ("1d", "norm"))

# seeds reach torch (< 2**64), NumPy, DALI (< 2**63) and derived seeds such as seed * 1_000_003 + epoch;
# 31 bits keeps every one of them valid, and is what most seed APIs take
SEED_MAX = 2**31 - 1
# the optimizers whose hyperparameters a captured step can read from the device (fasttrain.train.device_optim)
CAPTURABLE_OPTIMIZERS = ("sgd", "adam", "adamw")

# Upper bounds: each the most a real run could use, so that a typo (an extra zero, 1e12, inf) fails here
# in one line, before the run folder exists, instead of forking for minutes or filling memory later.
EPOCHS_MAX = 100_000  # ImageNet recipes run 90 to 600 epochs; CIFAR-10 ones 10 to 200
STEPS_MAX = 10**9  # optimizer steps, batches and step intervals: more than any run takes
BATCH_MAX = 65_536  # images per process in one batch: the largest large-batch recipes use this many in all
IMAGE_SIDE_MAX = 1024  # pixels a side: a folder split is held decoded in host memory (3 MiB an image here)
HIDDEN_MAX = 65_536  # one hidden layer of 65536 after another is 4.3e9 weights (17 GB): the most that fits
LR_MAX = 1000.0  # learning rates: LARS-style recipes peak near 30; runs that test divergence use 10
WORKERS_PER_CPU = 4  # data.num_workers <= 4 x os.cpu_count(): more only adds fork and memory cost
# every split is held in host memory as uint8 (at least 784 bytes an image, MNIST's), so 1e8 images is at
# least 78 GB: more than a host gives one split
SPLIT_MAX = 10**8
# data.dataset=synthetic generates each split in host memory: three float32 copies of a 3x32x32 image at the
# peak of fasttrain.data.synthetic.make_synthetic (36 KiB an image, measured); a split must fit this budget
HOST_MEMORY_BUDGET = 16 * 2**30
SYNTHETIC_PEAK_BYTES = 3 * 4 * 3 * 32 * 32
SYNTHETIC_MAX = HOST_MEMORY_BUDGET // SYNTHETIC_PEAK_BYTES
# the array datasets' own image side (fasttrain.data.load_split checks data.image_size against the arrays);
# data.dataset=folder learns its side when it scans the images
DATASET_SIDES = {"cifar10": 32, "mnist": 28, "synthetic": 32}

# model.name beyond the registry: a torchvision classification model, or your own callable. The config
# checks their syntax only (nothing is imported before the run is accepted); fasttrain.models.imported imports
# and builds them, and says there what was not found
TORCHVISION_PREFIX = "torchvision:"
_IDENTIFIER = r"[A-Za-z_]\w*"
_TORCHVISION_NAME_RE = re.compile(rf"^torchvision:{_IDENTIFIER}$")
_IMPORT_PATH_RE = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*$")


def check_import_form(key: str, value: str) -> None:
    """A model.name that is no registered name: torchvision:<name>, or package.module:callable from your
    own code."""
    pattern = _TORCHVISION_NAME_RE if value.startswith(TORCHVISION_PREFIX) else _IMPORT_PATH_RE
    require(bool(pattern.match(value)), key, value, model_names_accepted())
    if not value.startswith(TORCHVISION_PREFIX):
        check_not_stdlib(value)


def check_not_stdlib(reference: str) -> None:
    """A package.module:callable model must come from your own code: the standard library (and builtins)
    holds no model, and `os:system` or `builtins:eval` with model.kwargs would run a command or code.
    Refused from the name alone, before anything is imported or called."""
    top = reference.partition(":")[0].partition(".")[0]
    if top in sys.stdlib_module_names:
        raise ConfigError(f"config error: model.name={reference!r} is not valid: {top!r} is a Python standard-library "
                          f"module, which holds no model; name a class (an nn.Module subclass) or function in a "
                          f"module of your own")


def model_names_accepted() -> str:
    """What model.name accepts, for error messages: the registered names and the two import forms."""
    return f"a registered name ({', '.join(MODELS.names())}), torchvision:<name> or package.module:callable"
