"""Typed configs, one dataclass per concern, filled from YAML and `key.sub=value` overrides.

OmegaConf does the YAML parsing, merging and type checking (structured configs reject unknown
keys and values that do not convert to the field's type); each dataclass's `__post_init__`
checks ranges and choices. Every failure becomes one `ConfigError` line naming the key and
what it accepts, which the entry points turn into exit code 2 before any work starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from fasttrain.errors import ConfigError
# the registries are the lists of names the config accepts: register an entry, and its name is valid
from fasttrain.config.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, Registry



class Choice(str, enum.Enum):
    """A closed set of names for one config key. OmegaConf accepts only a member's name there, and a
    member compares, hashes, prints and serialises as that name (`PrecisionName.bf16 == "bf16"`), so
    YAML, logs, checkpoints and code read the same. Open sets (models, datasets, optimizers,
    schedules) are registries instead: anyone can add to those."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def names(cls) -> List[str]:
        return [member.value for member in cls]


def _choices(name: str, names: Sequence[str]) -> Any:
    # the functional form: compile modes are not Python identifiers (reduce-overhead)
    return Choice(name, [(n, n) for n in names], module=__name__, qualname=name)


LoaderName = _choices("LoaderName", ("plain", "gpu", "dali", "auto"))
PrecisionName = _choices("PrecisionName", ("fp32", "bf16", "fp16"))
CompileMode = _choices("CompileMode", ("off", "default", "reduce-overhead", "max-autotune"))
BackendName = _choices("BackendName", ("auto", "nccl", "gloo"))
SignalName = _choices("SignalName", ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP", "SIGCONT"))
TtaName = _choices("TtaName", ("none", "flip", "flip_shift"))
# seeds reach torch (< 2**64), NumPy, DALI (< 2**63) and derived seeds such as seed * 1_000_003 + epoch;
# 31 bits keeps every one of them valid, and is what most seed APIs take
SEED_MAX = 2**31 - 1
# the optimizers whose hyperparameters a captured step can read from the device (fasttrain.train.step)
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


@dataclass(frozen=True)
class Range:
    """The values a number key accepts: `low`/`high` inclusive, `above`/`below` exclusive; `what` and
    `note` complete the error's "expected ..." ("an integer >= 0 (0 = all)")."""
    what: str
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None
    note: str = ""
    said: str = ""  # the whole "expected ..." where the bounds alone would say it less clearly

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):  # nan passes no comparison, inf an open bound
            return False
        return ((self.low is None or value >= self.low) and (self.high is None or value <= self.high)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def expected(self) -> str:
        if self.said:
            return self.said

        def shown(bound: float) -> str:
            return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"

        start = ("[", self.low) if self.low is not None else ("(", self.above) if self.above is not None else None
        end = ("]", self.high) if self.high is not None else (")", self.below) if self.below is not None else None
        if start and end:
            text = f"{self.what} in {start[0]}{shown(start[1])}, {shown(end[1])}{end[0]}"
        elif start:
            text = f"{self.what} {'>=' if start[0] == '[' else '>'} {shown(start[1])}"
        else:
            assert end is not None
            text = f"{self.what} {'<=' if end[0] == ']' else '<'} {shown(end[1])}"
        return text + (f" ({self.note})" if self.note else "")


def _field(default: Any, doc: str, choices: Optional[Registry] = None, *, low: Optional[float] = None,
           high: Optional[float] = None, above: Optional[float] = None, below: Optional[float] = None,
           what: str = "", note: str = "", expected: str = "") -> Any:
    """A dataclass field with a help line (shown by `fasttrain train --help`) and what it accepts,
    checked by `Section`: a registry's names (`choices`: the help line starts with them, read when
    shown, since the entries' modules import this one), or a range of numbers."""
    bounded = any(bound is not None for bound in (low, high, above, below))
    kind = what or ("an integer" if isinstance(default, int) else "a float")
    metadata = {"doc": doc, "choices": choices,
                "range": Range(kind, low, high, above, below, note, expected) if bounded else None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _doc(f: dataclasses.Field) -> str:
    """A field's help line: its registry's names first, where it has one."""
    doc, choices = f.metadata.get("doc", ""), f.metadata.get("choices")
    if choices is None:
        return doc
    return " | ".join(choices.names()) + (f" {doc}" if doc else "")


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}={value!r} is not valid: expected {expected}")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    _require(value in choices, key, value, "one of " + ", ".join(choices))


# --------------------------------------------------------------------------- sections


class Section:
    """One config section (`key`: its name in YAML). Once OmegaConf has filled it, each field's
    registry and range (declared with `_field`) are checked, then `check()`: what one field
    cannot say alone."""

    key: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, registry, accepted = getattr(self, f.name), f.metadata.get("choices"), f.metadata.get("range")
            if registry is not None:
                self.check_name(f"{self.key}.{f.name}", value, registry)
            if accepted is not None:
                _require(accepted.holds(value), f"{self.key}.{f.name}", value, accepted.expected())
        self.check()

    def check_name(self, key: str, value: str, registry: Registry) -> None:
        """A registry key's value: one of the registered names (ModelConfig accepts import paths too)."""
        _choice(key, value, registry.names())

    def check(self) -> None:
        pass


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"
    dataset: str = _field("cifar10", "", DATASETS)
    root: str = _field("./data", "folder that contains cifar-10-batches-py/ (or MNIST/; folder: train/<class>/ and "
                                 "val/<class>/ image folders)")
    download: bool = _field(True, "download with torchvision when the data are missing")
    loader: LoaderName = _field(LoaderName.plain, "plain (torchvision transforms + DataLoader) | gpu (whole split on "
                                "the device, batched augmentation) | dali (NVIDIA DALI pipeline) | auto (the fastest "
                                "that applies; logged)")
    num_workers: int = _field(-1, "DataLoader worker processes (0 = load in the main process; -1 = auto: min(4, CPUs "
                                  "this process may use / processes on the node), logged); DALI CPU threads",
                              low=-1, expected="an integer >= 0, or -1 (auto)")  # its upper bound: check()
    pin_memory: Optional[bool] = _field(None, "pin host memory; null = on when training on CUDA")
    shuffle: bool = _field(True, "reshuffle the training set every epoch")
    drop_last: bool = _field(False, "drop the last incomplete training batch")
    persistent_workers: bool = _field(True, "keep DataLoader workers alive between epochs")
    train_size: int = _field(0, "use a seeded random subset of this many training images (0 = all; synthetic: 5000)",
                             low=0, note="0 = all")  # its upper bound: check()
    val_size: int = _field(0, "use a seeded random subset of this many test images (0 = all; synthetic: 1000)",
                           low=0, note="0 = all")  # its upper bound: check()
    subset_seed: int = _field(0, "seed of the subset choice (independent of train.seed; 0 to 2147483647)",
                              low=0, high=SEED_MAX)
    mean: List[float] = _field([0.5, 0.5, 0.5], "Normalize mean, one value or one per channel")
    std: List[float] = _field([0.5, 0.5, 0.5], "Normalize std, one value or one per channel")
    image_size: int = _field(0, "side of the square training images (folder: each image resized and cropped to it; "
                                "0 = the dataset's own size: folder images must then all be square and of one size; "
                                "cifar10 / mnist / synthetic accept only 0 or their own size)",
                             low=0, high=IMAGE_SIDE_MAX, note="0 = the dataset's own size")
    skip_bad_images: bool = _field(False, "folder: leave out image files that cannot be opened (counted in the log) "
                                          "instead of stopping with their name")
    cache_dir: str = _field("", "cifar10 / mnist: keep the decoded arrays as .npy files here, so the next run reads "
                                "them instead of unpickling the dataset ('' = $FASTTRAIN_CACHE_DIR/data, else "
                                "$XDG_CACHE_HOME/fasttrain/data or ~/.cache/fasttrain/data; off = no cache)")

    def check(self) -> None:
        cpus = os.cpu_count() or 1
        _require(self.num_workers <= WORKERS_PER_CPU * cpus, "data.num_workers", self.num_workers,
                 f"an integer in [-1, {WORKERS_PER_CPU * cpus}] ({WORKERS_PER_CPU} x os.cpu_count() = "
                 f"{WORKERS_PER_CPU} x {cpus} on this machine; -1 = auto): set data.num_workers=-1")
        for key, size in (("train_size", self.train_size), ("val_size", self.val_size)):
            if self.dataset == "synthetic":
                _require(size <= SYNTHETIC_MAX, f"data.{key}", size,
                         f"an integer in [0, {SYNTHETIC_MAX}] with data.dataset=synthetic (0 = the default; its "
                         f"images are generated in host memory, {SYNTHETIC_PEAK_BYTES // 1024} KiB each at the peak: "
                         f"{SYNTHETIC_MAX} fill the {HOST_MEMORY_BUDGET // 2**30} GiB budget of a split): set a "
                         f"smaller data.{key}")
            else:
                _require(size <= SPLIT_MAX, f"data.{key}", size,
                         f"an integer in [0, {SPLIT_MAX}] (0 = all; a split is held in host memory, at least 784 "
                         f"bytes an image, and a larger subset than the dataset is all of it): set data.{key}=0")
        # ToTensor scales pixels to [0, 1]; 255 leaves room for statistics written on the 0-255 scale
        _require(len(self.mean) in (1, 3), "data.mean", list(self.mean), "a list of 1 or 3 floats")
        _require(all(abs(m) <= 255 for m in self.mean), "data.mean", list(self.mean), "floats in [-255, 255]")
        _require(len(self.std) in (1, 3), "data.std", list(self.std), "a list of 1 or 3 floats")
        _require(all(0 < s <= 255 for s in self.std), "data.std", list(self.std), "floats in (0, 255]")


@dataclass
class AugConfig(Section):
    key: ClassVar[str] = "aug"
    crop_padding: int = _field(4, "RandomCrop(size, padding=N) on training images; 0 = no crop (at most "
                                   "the image side)", low=0)  # its upper bound: Config.__post_init__
    hflip: bool = _field(True, "RandomHorizontalFlip on training images")
    rotation: float = _field(0.0, "RandomRotation(degrees); 0 = off", low=0, high=180, what="degrees")
    color_jitter: List[float] = _field([0.0, 0.0, 0.0, 0.0], "ColorJitter [brightness, contrast, saturation, hue]; "
                                                            "zeros = off")

    def check(self) -> None:
        jitter = list(self.color_jitter)
        # a factor of 10 already spans [0, 11] times the brightness, contrast or saturation
        _require(len(jitter) == 4 and all(0 <= v <= 10 for v in jitter), "aug.color_jitter", jitter,
                 "4 values in [0, 10]: [brightness, contrast, saturation, hue]")
        _require(jitter[3] <= 0.5, "aug.color_jitter", jitter, "hue (the 4th value) <= 0.5")


# model.name beyond the registry: a torchvision classification model, or your own callable. The config
# checks their syntax only (nothing is imported before the run is accepted); fasttrain.models imports
# and builds them, and says there what was not found
TORCHVISION_PREFIX = "torchvision:"
_IDENTIFIER = r"[A-Za-z_]\w*"
_TORCHVISION_NAME_RE = re.compile(rf"^torchvision:{_IDENTIFIER}$")
_IMPORT_PATH_RE = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*$")


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


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"
    name: str = _field("CIFAR10_CNN", "| torchvision:<name> (a torchvision classification model, e.g. "
                                      "torchvision:resnet18) | package.module:callable (your own, returning an "
                                      "nn.Module)", MODELS)
    hidden_sizes: List[int] = _field([512, 256], "hidden layer widths of MLP / MLPSequential")
    dropout: float = _field(0.5, "dropout before the last layer of CIFAR10_CNN and MLP", low=0, below=1,
                            what="a probability")
    # a mapping: _field's defaults are scalars or lists
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "keyword arguments of a torchvision: or package.module:callable model (model.kwargs.width=64); "
               "they win over the num_classes / in_channels / image_size fasttrain passes; the built-in models take none"})

    def check_name(self, key: str, value: str, registry: Registry) -> None:
        if value in registry.names() or ":" not in value:  # a plain name keeps the message listing the registry
            super().check_name(key, value, registry)
            return
        pattern = _TORCHVISION_NAME_RE if value.startswith(TORCHVISION_PREFIX) else _IMPORT_PATH_RE
        _require(bool(pattern.match(value)), key, value, model_names_accepted())
        if not value.startswith(TORCHVISION_PREFIX):
            check_not_stdlib(value)

    def check(self) -> None:
        _require(len(self.hidden_sizes) >= 1 and all(1 <= h <= HIDDEN_MAX for h in self.hidden_sizes),
                 "model.hidden_sizes", list(self.hidden_sizes), f"a non-empty list of integers in [1, {HIDDEN_MAX}]")
        # the built-in builders read model.hidden_sizes and model.dropout, nothing else: kwargs given to them
        # would be dropped without a word. A builder registered elsewhere gets the whole ModelConfig and may
        # read model.kwargs itself.
        if self.kwargs and self.name in MODELS and MODELS.is_builtin(self.name):
            raise ConfigError(f"config error: model.kwargs={dict(self.kwargs)!r} is not valid with "
                              f"model.name={self.name!r}: the built-in models accept no model.kwargs (set "
                              f"model.hidden_sizes or model.dropout instead), only torchvision:<name> and "
                              f"package.module:callable models take them; remove model.kwargs")


@dataclass
class OptimConfig(Section):
    key: ClassVar[str] = "optim"
    name: str = _field("adamw", "", OPTIMIZERS)
    lr: float = _field(1e-3, "learning rate (OneCycleLR overrides it with sched.max_lr / sched.div_factor)", above=0,
                       high=LR_MAX)
    weight_decay: float = _field(0.01, "weight decay (decoupled for adamw)", low=0, high=10)
    momentum: float = _field(0.9, "sgd momentum", low=0, below=1)
    nesterov: bool = _field(False, "sgd Nesterov momentum (needs momentum > 0)")
    betas: List[float] = _field([0.9, 0.999], "adam/adamw betas")
    decay_bn_bias: bool = _field(True, "weight decay on BatchNorm and bias parameters (every 1-d parameter) too; "
                                       "false = decay only the weight matrices and convolution kernels")
    bn_bias_lr_scale: float = _field(1.0, "learning-rate multiplier of BatchNorm and bias parameters (every 1-d "
                                          "parameter), applied through every schedule", above=0, high=LR_MAX)

    def check(self) -> None:
        _require(not (self.nesterov and self.name == "sgd" and self.momentum == 0), "optim.nesterov",
                 self.nesterov, "false when optim.momentum is 0 (Nesterov needs momentum)")
        betas = list(self.betas)
        _require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", betas,
                 "two floats in [0, 1)")


@dataclass
class SchedConfig(Section):
    key: ClassVar[str] = "sched"
    name: str = _field("onecycle", "(onecycle steps every batch, plateau on val_loss, the rest every epoch)", SCHEDULES)
    step_size: int = _field(30, "step: epochs between decays", low=1, high=EPOCHS_MAX)
    gamma: float = _field(0.1, "step / exponential: decay factor", above=0, high=1)
    t_max: int = _field(0, "cosine: period in epochs (0 = train.epochs)", low=0, high=EPOCHS_MAX,
                       note="0 = train.epochs")
    eta_min: float = _field(0.0, "cosine: lowest learning rate", low=0, high=LR_MAX)
    max_lr: float = _field(0.01, "onecycle: peak learning rate", above=0, high=LR_MAX)
    pct_start: float = _field(0.3, "onecycle: fraction of steps spent warming up", above=0, below=1)
    div_factor: float = _field(25.0, "onecycle: initial lr = max_lr / div_factor", above=0, high=1e6)
    final_div_factor: float = _field(1e4, "onecycle: final lr = initial lr / final_div_factor",
                                     above=0, high=1e9)
    plateau_factor: float = _field(0.1, "plateau: factor applied when val_loss stops improving", above=0, below=1)
    plateau_patience: int = _field(10, "plateau: epochs without improvement before reducing", low=0,
                                  high=EPOCHS_MAX)
    min_lr: float = _field(0.0, "plateau: lower bound on the learning rate", low=0, high=LR_MAX)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"
    epochs: int = _field(100, "number of passes over the training set", low=1, high=EPOCHS_MAX)
    batch_size: int = _field(128, "training batch size per process (global batch = batch_size x world size)", low=1,
                            high=BATCH_MAX)
    eval_batch_size: int = _field(0, "evaluation batch size (0 = train.batch_size)", low=0,
                                 high=BATCH_MAX, note="0 = train.batch_size")
    seed: int = _field(42, "seed of weights, shuffling and augmentation (0 to 2147483647)", low=0, high=SEED_MAX)
    device: str = _field("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available)")
    limit_train_batches: int = _field(0, "stop each epoch after this many batches (0 = whole epoch)", low=0,
                                      high=STEPS_MAX, note="0 = whole epoch")
    log_every: int = _field(50, "log the mean loss and images/s every N steps (one host sync each)", low=1,
                           high=STEPS_MAX)
    grad_clip: float = _field(0.0, "clip the gradient norm to this value (0 = off)", low=0, high=1e6,
                              note="0 = off")
    precision: PrecisionName = _field(PrecisionName.fp32, "fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, "
                                                          "CUDA only)")
    tf32: bool = _field(True, "allow TF32 matmuls and convolutions on CUDA")
    channels_last: bool = _field(False, "model and input batches in channels_last memory format")
    compile: CompileMode = _field(CompileMode.off, "torch.compile mode: off | default | reduce-overhead | "
                                                   "max-autotune")
    capture: bool = _field(False, "compile the whole training step (forward, loss, backward, gradient all-reduce, "
                                  "optimizer, running sums) and on CUDA replay it as one CUDA graph: the host's "
                                  "cost per step becomes a few launches; needs train.compile=default or "
                                  "max-autotune, optim adam/adamw, precision fp32/bf16")
    deterministic: bool = _field(False, "deterministic algorithms only (torch.use_deterministic_algorithms, no cuDNN "
                                        "autotuning, CUBLAS_WORKSPACE_CONFIG set): bitwise repeatable on a GPU, slower")
    peak_tflops: float = _field(0.0, "the device's peak TFLOP/s for MFU (0 = fasttrain's table of known GPUs; "
                                     "no MFU where unknown, e.g. CPUs)", low=0, high=100_000,
                                note="0 = known GPUs")
    stop_after_steps: int = _field(0, "stop with a resumable checkpoint once this many optimizer steps are done in "
                                      "all (0 = train every epoch); the schedule still spans train.epochs, so a "
                                      "later resume=auto continues it exactly", low=0, high=STEPS_MAX,
                                  note="0 = no early stop")
    label_smoothing: float = _field(0.0, "label smoothing of the training loss (0 = off); validation reports the "
                                         "plain cross-entropy", low=0, below=1, what="a fraction")
    ema_decay: float = _field(0.0, "keep an exponential moving average of the weights with this decay per update "
                                   "(0 = off; e.g. 0.99): validation, best.pt's choice and fasttrain eval use the "
                                   "averaged weights; checkpoints hold both", low=0, below=1, what="a fraction")
    ema_every: int = _field(1, "update the weight average every N optimizer steps", low=1,
                           high=STEPS_MAX)
    lookahead_k: int = _field(0, "lookahead: every k optimizer steps the slow weights move lookahead_alpha of the "
                                 "way to the trained ones, and training continues from them (0 = off)", low=0,
                              high=STEPS_MAX, note="0 = off")
    lookahead_alpha: float = _field(0.5, "lookahead: how far the slow weights move at each sync", above=0, high=1,
                                    what="a fraction")
    tta: TtaName = _field(TtaName.none, "test-time augmentation of validation and fasttrain eval: none | flip (the "
                                        "mean of the logits of each image and its mirror) | flip_shift (and of both "
                                        "shifted one pixel up-left and down-right: 6 views)")
    eval_every: int = _field(1, "validate every N epochs; the last epoch always validates (the epochs between have "
                                "no val_* values, and best.pt is chosen among validated epochs)", low=1,
                            high=EPOCHS_MAX)
    target_acc: float = _field(0.0, "stop once validation accuracy reaches this fraction (0 = off), recording the "
                                    "time from process start and the steps it took", low=0, high=1,
                               what="a fraction", note="0 = off")
    compile_cache: str = _field("", "folder of torch.compile's caches (Inductor's compiled graphs, AOTAutograd's): "
                                    "'' = PyTorch's default ($TORCHINDUCTOR_CACHE_DIR, else "
                                    "/tmp/torchinductor_<user>), off = compile from scratch, or a folder (e.g. on "
                                    "a shared file system, so every node of a cluster starts warm)")

    def check(self) -> None:
        _require(bool(_DEVICE_RE.match(self.device)), "train.device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass
class DistConfig(Section):
    key: ClassVar[str] = "dist"
    backend: BackendName = _field(BackendName.auto, "auto | nccl | gloo (auto = nccl on CUDA, gloo on CPU)")
    timeout_s: int = _field(1800, "seconds a collective may wait for the other ranks before failing",
                            low=1, high=10**9, note="seconds")


@dataclass
class CheckpointConfig(Section):
    key: ClassVar[str] = "checkpoint"
    every_steps: int = _field(0, "also write a resumable checkpoint every N optimizer steps, mid-epoch included "
                                 "(0 = at epoch ends only)", low=0, high=STEPS_MAX,
                             note="0 = epoch ends")
    keep: int = _field(3, "how many of those step checkpoints to keep (the newest; last.pt and best.pt are kept "
                          "apart)", low=1, high=10_000)
    signals: List[SignalName] = _field([SignalName.SIGTERM, SignalName.SIGUSR1],
                                       "signals that mean 'preempted': the run saves a checkpoint at the next step "
                                       "boundary on every rank and exits with code 75 ([] = none)")
    signal_check_every: int = _field(0, "0 = the ranks agree on the preemption flag at every log interval, inside "
                                        "the reduction that runs there anyway (stop within train.log_every steps); "
                                        "N = also every N steps, with one small CPU collective of its own",
                                     low=0, high=STEPS_MAX, note="0 = at log intervals only")
    every_epochs: int = _field(1, "write last.pt (and best.pt when validation improved) every N epochs; the last "
                                  "epoch always", low=1, high=EPOCHS_MAX)
    background: bool = _field(True, "write epoch and periodic checkpoints from a background thread once the state "
                                    "is copied to host memory, while training goes on (the next save waits for "
                                    "it); preemption, Ctrl-C and the run's last save stay synchronous")


@dataclass
class OutputConfig(Section):
    key: ClassVar[str] = "output"
    dir: str = _field("", "run folder (empty = runs/<output.name>, or runs/<config name>-<timestamp>)")
    name: str = _field("", "run name: the run folder is runs/<name> when output.dir is empty")
    save_checkpoints: bool = _field(True, "write checkpoints/best.pt and checkpoints/last.pt")
    overwrite: bool = _field(False, "with resume=none: allow a run folder that already holds checkpoints to be "
                                    "started over (its checkpoints are replaced)")
    tensorboard: bool = _field(False, "also write TensorBoard event files to <output.dir>/tensorboard "
                                      "(needs the tensorboard package)")

    def check(self) -> None:
        _require("/" not in self.name and self.name not in (".", ".."), "output.name", self.name,
                 "a folder name without '/' (use output.dir for a path)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: str = _field("none", "none (start fresh) | auto (the newest valid checkpoint in output.dir, or fresh "
                                 "when it has none) | PATH (that checkpoint file)")

    def __post_init__(self) -> None:
        _require(bool(self.resume), "resume", self.resume, "none, auto or the path of a checkpoint file")
        # RandomCrop pads each side by aug.crop_padding: more than the image side crops padding only
        side = self.data.image_size or DATASET_SIDES.get(self.data.dataset, 0)
        which = (f"data.image_size={side}" if self.data.image_size else f"the image side of data.dataset="
                 f"{self.data.dataset}" if side else f"the largest data.image_size; data.dataset={self.data.dataset}'s "
                 f"own side is known once its images are read")
        _require(self.aug.crop_padding <= (side or IMAGE_SIDE_MAX), "aug.crop_padding", self.aug.crop_padding,
                 f"an integer in [0, {side or IMAGE_SIDE_MAX}] ({which}): set a smaller aug.crop_padding, or 0 for "
                 f"no crop")
        if self.train.capture:
            _require(self.train.compile in ("default", "max-autotune"), "train.compile", self.train.compile,
                     "default or max-autotune with train.capture=true (the captured step is compiled; "
                     "reduce-overhead would record CUDA graphs of its own inside it)")
            _require(self.train.precision != "fp16", "train.precision", self.train.precision,
                     "fp32 or bf16 with train.capture=true (fp16's GradScaler decides on the host whether to "
                     "step; bf16 needs no scaler)")
            _require(self.optim.name in CAPTURABLE_OPTIMIZERS, "optim.name", self.optim.name,
                     f"{', '.join(CAPTURABLE_OPTIMIZERS)} with train.capture=true (the captured step reads their "
                     f"learning rate, betas and momentum from device tensors that the schedule updates)")


# --------------------------------------------------------------------------- loading


def _format_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError):
        section = key.rsplit(".", 1)[0] if "." in key else ""
        valid = valid_keys(section)
        where = f"in '{section}'" if section else "at the top level"
        return f"config error: unknown key '{key}'; valid keys {where}: {', '.join(valid)}"
    choice = _choice_type(key)
    if choice is not None and isinstance(err, ValidationError):  # a name outside a closed set
        return (f"config error: {key.split('[')[0]}={getattr(err, 'value', None)!r} is not valid: expected one of "
                f"{', '.join(choice.names())}")
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if key:
        expected = _expected_type(key)
        return f"config error: {key}: {message}" + (f" (expected {expected})" if expected else "")
    return f"config error: {message}"


def _section_default(section: str) -> Any:
    """The default dataclass instance of a section ('' = the whole Config), or None."""
    obj: Any = Config()
    for part in [p for p in section.split(".") if p]:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if dataclasses.is_dataclass(obj) else None


def valid_keys(section: str) -> List[str]:
    obj = _section_default(section)
    return [f.name for f in dataclasses.fields(obj)] if obj is not None else []


def _expected_type(full_key: str) -> str:
    section, _, name = full_key.split("[")[0].rpartition(".")
    obj = _section_default(section)
    if obj is None:
        return ""
    for f in dataclasses.fields(obj):
        if f.name == name:
            return str(f.type).replace("typing.", "")
    return ""


def _choice_type(full_key: str) -> Optional[type]:
    """The Choice enum behind a key (or behind its list's items), else None."""
    declared = _expected_type(full_key) if full_key else ""
    found = globals().get(declared.removeprefix("List[").removesuffix("]"))
    return found if isinstance(found, type) and issubclass(found, Choice) else None


_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_PARSE_ERRORS = (yaml.YAMLError, OmegaConfBaseException, ValueError, TypeError, IndexError, KeyError)


def _parse_overrides(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"config error: override '{item}' must look like key.sub=value (e.g. train.epochs=5)")
        key = item.split("=", 1)[0]
        if not _KEY_RE.match(key):
            raise ConfigError(f"config error: override '{_shorten(item)}' has no valid key ('{_shorten(key)}'): "
                              f"keys are dotted names such as train.epochs, and a list is set whole "
                              f"(data.mean=[0.4,0.5,0.5])")
        try:
            OmegaConf.from_dotlist([item])  # one at a time: the error names the override that is wrong
        except _PARSE_ERRORS as err:
            raise ConfigError(f"config error: override '{_shorten(item)}' is not valid YAML "
                              f"({_first_line(err)}): close its brackets and braces, or quote the value "
                              f"(e.g. model.hidden_sizes=[64,32])") from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except _PARSE_ERRORS as err:
        raise ConfigError(f"config error: cannot combine overrides {list(overrides)}: {_first_line(err)}") from None


def _first_line(err: BaseException, line: bool = False) -> str:
    """What a parse error says, in one line: YAML's problem (with its line in a file when `line`),
    else the first line of the message, else the error's type."""
    problem = getattr(err, "problem", None)
    if problem:
        mark = getattr(err, "problem_mark", None)
        return f"{problem} at line {mark.line + 1}" if line and mark is not None else str(problem)
    lines = [text.strip() for text in str(err).splitlines() if text.strip()]
    return lines[0] if lines else type(err).__name__


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 4:]} ({len(text)} characters)"


def _read_yaml_text(path: str) -> str:
    """The text of a config file: UTF-8 without NUL bytes (a binary file is not a recipe)."""
    file = Path(path)
    try:
        if not file.is_file():
            raise ConfigError(f"config error: config file '{path}' not found (see configs/ for the shipped recipes)")
        data = file.read_bytes()
    except OSError as err:  # unreadable, or a path too long for the file system
        raise ConfigError(f"config error: cannot read config file '{_shorten(path)}' ({err.strerror or err}): "
                          f"give the path of a readable .yaml file (see configs/)") from None
    bad = data.find(b"\0")  # NUL is valid UTF-8 but never text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start if bad < 0 else min(bad, err.start)
    if bad < 0:
        return text
    raise ConfigError(f"config error: '{path}' is not a text YAML file (byte {data[bad]:#04x} at offset {bad} is "
                      f"not UTF-8 text): give a YAML recipe saved as UTF-8, such as configs/cifar10_cnn.yaml")


def _check_output_dir(run_dir: str, key: str) -> None:
    """A run folder whose name the file system can hold: each part within NAME_MAX, the whole
    (with the files fasttrain writes inside it) within PATH_MAX. Checked before any work."""
    path = Path(os.path.abspath(run_dir))
    existing = next((p for p in [path, *path.parents] if _exists(p)), Path("/"))
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    path_max = _pathconf(existing, "PC_PATH_MAX", 4096)
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"config error: {key} holds a name of {len(os.fsencode(part))} bytes "
                              f"('{_shorten(part, 40)}'); this file system allows {name_max} per folder name: "
                              f"use a shorter {key}")
    inside = 128  # room for the files a run writes inside it (checkpoints/.step-NNNNNNNN.pt.XXXXXXXX.tmp, ...)
    if len(os.fsencode(str(path))) + inside >= path_max:
        raise ConfigError(f"config error: {key} makes a run folder path of {len(os.fsencode(str(path)))} bytes "
                          f"('{_shorten(str(path), 60)}'); this file system allows {path_max - inside - 1} for "
                          f"a run folder (its files need the rest of {path_max}): use a shorter {key}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # ENAMETOOLONG and the like: not an existing folder
        return False


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + overrides -> validated Config. Raises ConfigError (exit 2)."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path is not None:
        text = _read_yaml_text(path)
        try:
            loaded = OmegaConf.load(io.StringIO(text))
        except (yaml.YAMLError, OmegaConfBaseException, ValueError) as err:
            raise ConfigError(f"config error: '{path}' is not valid YAML: {_first_line(err, line=True)}") from None
        if not OmegaConf.is_dict(loaded):
            raise ConfigError(f"config error: '{path}' must hold a mapping of sections (data:, model:, ...)")
        layers.append(loaded)
    layers.append(_parse_overrides(overrides))
    cfg = _build(layers)
    key = "output.dir"
    if not cfg.output.dir:
        stem = Path(path).stem if path else "run"
        cfg.output.dir = str(Path("runs") / (cfg.output.name or f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
        key = "output.name" if cfg.output.name else "output.dir"
    _check_output_dir(cfg.output.dir, key)
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain Python values only (a Choice becomes its name): checkpoints load with weights_only=True."""
    def plain(value: Any) -> Any:
        if isinstance(value, Choice):
            return value.value
        return [plain(item) for item in value] if isinstance(value, list) else value

    return dataclasses.asdict(cfg, dict_factory=lambda items: {key: plain(value) for key, value in items})


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """Rebuild a Config from a saved dict (a checkpoint's), applying overrides on top."""
    try:
        saved = OmegaConf.create(data)
    except OmegaConfBaseException as err:
        raise ConfigError(_format_omegaconf_error(err)) from None
    return _build([OmegaConf.structured(Config), saved, _parse_overrides(overrides)])


def _build(layers: List[Any]) -> Config:
    """The schema merged with the layers (file, saved dict, overrides) -> validated Config."""
    try:
        for layer in layers[1:]:
            _compile_false_is_off(layer)
        merged = OmegaConf.merge(*layers)
        _check_list_items(merged)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        # to_object wraps errors raised in __post_init__; surface ours unchanged
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(_format_omegaconf_error(err)) from None
    except (TypeError, ValueError) as err:  # OmegaConf's merge of a mapping into a list key, or the reverse
        key, given = _container_mismatch(layers[1:])
        if not key:
            raise ConfigError(f"config error: {_first_line(err)}") from None
        written = "a list is written [a, b]" if given == "{...}" else "a mapping is written {name: value}"
        raise ConfigError(f"config error: {key}={given} is not valid: expected {_expected_type(key)} "
                          f"({written})") from None
    assert isinstance(cfg, Config)
    return cfg


# keys that take a folder, '' (the default place) or off: YAML reads `off` (and no, false) as a boolean, and
# an empty override (key=) as null, which would otherwise reach the field as the folder "False" or fail
FOLDER_OR_OFF = (("train", "compile_cache"), ("data", "cache_dir"))


def _compile_false_is_off(layer: Any) -> None:
    """YAML's `compile: false` (or no, 0, null) means off; the CompileMode field takes names only. And the
    folder-or-off keys: a YAML boolean false is `off`, null is '' (the default place)."""
    if not OmegaConf.is_dict(layer):
        return
    train = layer.get("train")
    if OmegaConf.is_dict(train) and "compile" in train and not OmegaConf.is_interpolation(train, "compile"):
        if str(train.compile).lower() in ("false", "no", "none", "0"):
            train.compile = "off"
    for section_name, key in FOLDER_OR_OFF:
        section = layer.get(section_name)
        if not OmegaConf.is_dict(section) or key not in section or OmegaConf.is_interpolation(section, key):
            continue
        value = section[key]
        if value is False:
            section[key] = "off"
        elif value is None:
            section[key] = ""
        elif value is True:
            raise ConfigError(f"config error: {section_name}.{key}=true is not valid: expected a folder, '' (the "
                              f"default place) or off")


def _check_list_items(merged: Any) -> None:
    """OmegaConf checks a typed list's scalar items but lets a nested list or mapping through."""
    for section, values in OmegaConf.to_container(merged).items():
        for key, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, list) and any(isinstance(item, (list, dict)) for item in value):
                raise ConfigError(f"config error: {section}.{key}={value} is not valid: expected "
                                  f"{_expected_type(f'{section}.{key}')} (one value per item)")


def _container_mismatch(layers: Sequence[Any]) -> Tuple[str, str]:
    """(the first dotted key whose default is a list that a layer sets to a mapping, or whose default
    is a mapping that a layer sets to a list; how the given value is shown), ('', '') if none."""
    defaults = to_dict(Config())
    for layer in layers:
        for section, values in OmegaConf.to_container(layer).items():
            if isinstance(values, dict) and isinstance(defaults.get(section), dict):
                for key, value in values.items():
                    default = defaults[section].get(key)
                    if isinstance(value, dict) and isinstance(default, list):
                        return f"{section}.{key}", "{...}"
                    if isinstance(value, list) and isinstance(default, dict):
                        return f"{section}.{key}", "[...]"
    return "", ""


def describe_keys() -> List[str]:
    """One line per config key with its type, default and doc: the `--help` reference."""
    lines = []
    defaults = Config()
    for key, value, doc in all_keys(defaults):
        shown = "null" if value is None else repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"  {key} = {shown}    {doc}")
    return lines


def all_keys(cfg: Config) -> List[tuple]:
    """(dotted key, value, doc) for every leaf key: section keys, then top-level ones (resume)."""
    keys = []
    for top in dataclasses.fields(Config):
        value = getattr(cfg, top.name)
        if dataclasses.is_dataclass(value):
            keys += [(f"{top.name}.{f.name}", getattr(value, f.name), _doc(f)) for f in dataclasses.fields(value)]
        else:
            keys.append((top.name, value, _doc(top)))
    return keys
