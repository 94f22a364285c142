"""The config's schema: one dataclass per section, each field declaring its default, help line and what
it accepts (`fields.setting`); each section's `check()` says what one field cannot say alone, and
`Config.__post_init__` what spans sections.

OmegaConf fills these from YAML and overrides (load.py); structured configs reject unknown keys and values
that do not convert to the field's type, then each section checks ranges and names. Every failure is one
`ConfigError` line naming the key and what it accepts, which the entry points turn into exit code 2 before
any work starts.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from fasttrain.config.accepted import (BATCH_MAX, CAPTURABLE_OPTIMIZERS, DATASET_SIDES, EPOCHS_MAX, HIDDEN_MAX,
                                       HOST_MEMORY_BUDGET, IMAGE_SIDE_MAX, LR_MAX, SEED_MAX, SPLIT_MAX, STEPS_MAX,
                                       SYNTHETIC_MAX, SYNTHETIC_PEAK_BYTES, WORKERS_PER_CPU, BackendName, CompileMode,
                                       BnBiasScope, LoaderName, LookaheadEnd, LossReduction, PaddingMode, PrecisionName, SignalName, TtaName,
                                       check_import_form)
from fasttrain.config.fields import Section, require, setting
# the registries are the lists of names the config accepts: register an entry, and its name is valid
from fasttrain.config.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, Registry
from fasttrain.errors import ConfigError


@dataclass
class DataConfig(Section):
    key: ClassVar[str] = "data"
    dataset: str = setting("cifar10", "", DATASETS)
    root: str = setting("./data", "folder that contains cifar-10-batches-py/ (or MNIST/; folder: train/<class>/ and "
                                  "val/<class>/ image folders)")
    download: bool = setting(True, "download with torchvision when the data are missing")
    loader: LoaderName = setting(LoaderName.plain, "plain (torchvision transforms + DataLoader) | gpu (whole split on "
                                 "the device, batched augmentation) | dali (NVIDIA DALI pipeline) | auto (the fastest "
                                 "that applies; logged)")
    num_workers: int = setting(-1, "DataLoader worker processes (0 = load in the main process; -1 = auto: min(4, CPUs "
                                   "this process may use / processes on the node), logged); DALI CPU threads",
                               low=-1, said="an integer >= 0, or -1 (auto)")  # its upper bound: check()
    pin_memory: Optional[bool] = setting(None, "pin host memory; null = on when training on CUDA")
    shuffle: bool = setting(True, "reshuffle the training set every epoch")
    drop_last: bool = setting(False, "drop the last incomplete training batch")
    persistent_workers: bool = setting(True, "keep DataLoader workers alive between epochs")
    train_size: int = setting(0, "use a seeded random subset of this many training images (0 = all; synthetic: 5000)",
                              low=0, note="0 = all")  # its upper bound: check()
    val_size: int = setting(0, "use a seeded random subset of this many test images (0 = all; synthetic: 1000)",
                            low=0, note="0 = all")  # its upper bound: check()
    subset_seed: int = setting(0, "seed of the subset choice (independent of train.seed; 0 to 2147483647)",
                               low=0, high=SEED_MAX)
    mean: List[float] = setting([0.5, 0.5, 0.5], "Normalize mean, one value or one per channel")
    std: List[float] = setting([0.5, 0.5, 0.5], "Normalize std, one value or one per channel")
    image_size: int = setting(0, "side of the square training images (folder: each image resized and cropped to it; "
                                 "0 = the dataset's own size: folder images must then all be square and of one size; "
                                 "cifar10 / mnist accept only 0 or their own size; synthetic: 0 or up to 32)",
                              low=0, high=IMAGE_SIDE_MAX, note="0 = the dataset's own size")
    skip_bad_images: bool = setting(False, "folder: leave out image files that cannot be opened (counted in the log) "
                                           "instead of stopping with their name")
    cache_dir: str = setting("", "cifar10 / mnist: keep the decoded arrays as .npy files here, so the next run reads "
                                 "them instead of unpickling the dataset ('' = $FASTTRAIN_CACHE_DIR/data, else "
                                 "$XDG_CACHE_HOME/fasttrain/data or ~/.cache/fasttrain/data; off = no cache)")

    def check(self) -> None:
        cpus = os.cpu_count() or 1
        require(self.num_workers <= WORKERS_PER_CPU * cpus, "data.num_workers", self.num_workers,
                f"an integer in [-1, {WORKERS_PER_CPU * cpus}] ({WORKERS_PER_CPU} x os.cpu_count() = "
                f"{WORKERS_PER_CPU} x {cpus} on this machine; -1 = auto): set data.num_workers=-1")
        for key, size in (("train_size", self.train_size), ("val_size", self.val_size)):
            if self.dataset == "synthetic":
                require(size <= SYNTHETIC_MAX, f"data.{key}", size,
                        f"an integer in [0, {SYNTHETIC_MAX}] with data.dataset=synthetic (0 = the default; its "
                        f"images are generated in host memory, {SYNTHETIC_PEAK_BYTES // 1024} KiB each at the peak: "
                        f"{SYNTHETIC_MAX} fill the {HOST_MEMORY_BUDGET // 2**30} GiB budget of a split): set a "
                        f"smaller data.{key}")
            else:
                require(size <= SPLIT_MAX, f"data.{key}", size,
                        f"an integer in [0, {SPLIT_MAX}] (0 = all; a split is held in host memory, at least 784 "
                        f"bytes an image, and a larger subset than the dataset is all of it): set data.{key}=0")
        # ToTensor scales pixels to [0, 1]; 255 leaves room for statistics written on the 0-255 scale
        require(len(self.mean) in (1, 3), "data.mean", list(self.mean), "a list of 1 or 3 floats")
        require(all(abs(m) <= 255 for m in self.mean), "data.mean", list(self.mean), "floats in [-255, 255]")
        require(len(self.std) in (1, 3), "data.std", list(self.std), "a list of 1 or 3 floats")
        require(all(0 < s <= 255 for s in self.std), "data.std", list(self.std), "floats in (0, 255]")


@dataclass
class AugConfig(Section):
    key: ClassVar[str] = "aug"
    crop_padding: int = setting(4, "RandomCrop(size, padding=N) on training images; 0 = no crop (at most "
                                    "the image side)", low=0)  # its upper bound: Config.__post_init__
    crop_padding_mode: PaddingMode = setting(PaddingMode.zeros, "what the crop's border holds: zeros (RandomCrop's "
                                             "fill) | reflect (the image mirrored at its edges, the edge pixel not "
                                             "repeated, as torchvision's padding_mode='reflect': the speed records' "
                                             "translation); needs aug.crop_padding < the image side")
    hflip: bool = setting(True, "RandomHorizontalFlip on training images")
    flip_alternate: bool = setting(False, "with hflip: each image mirrored every other epoch (from a random start) "
                                          "instead of a coin per epoch, as the speed records do; gpu and dali loaders")
    rotation: float = setting(0.0, "RandomRotation(degrees); 0 = off", low=0, high=180, what="degrees")
    color_jitter: List[float] = setting([0.0, 0.0, 0.0, 0.0], "ColorJitter [brightness, contrast, saturation, hue]; "
                                                             "zeros = off")

    def check(self) -> None:
        if self.flip_alternate and not self.hflip:
            raise ConfigError("config error: aug.flip_alternate=true alternates flips, but aug.hflip=false turns them "
                              "off: set aug.hflip=true, or aug.flip_alternate=false")
        jitter = list(self.color_jitter)
        # a factor of 10 already spans [0, 11] times the brightness, contrast or saturation
        require(len(jitter) == 4 and all(0 <= v <= 10 for v in jitter), "aug.color_jitter", jitter,
                "4 values in [0, 10]: [brightness, contrast, saturation, hue]")
        require(jitter[3] <= 0.5, "aug.color_jitter", jitter, "hue (the 4th value) <= 0.5")


@dataclass
class ModelConfig(Section):
    key: ClassVar[str] = "model"
    name: str = setting("CIFAR10_CNN", "| torchvision:<name> (a torchvision classification model, e.g. "
                                       "torchvision:resnet18) | package.module:callable (your own, returning an "
                                       "nn.Module)", MODELS)
    hidden_sizes: List[int] = setting([512, 256], "hidden layer widths of MLP / MLPSequential")
    dropout: float = setting(0.5, "dropout before the last layer of CIFAR10_CNN and MLP", low=0, below=1,
                             what="a probability")
    # a mapping: setting's defaults are scalars or lists
    kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "keyword arguments of a torchvision: or package.module:callable model (model.kwargs.width=64); "
               "they win over the num_classes / in_channels / image_size fasttrain passes; the built-in models take none"})

    def check_name(self, key: str, value: str, registry: Registry) -> None:
        if value in registry.names() or ":" not in value:  # a plain name keeps the message listing the registry
            super().check_name(key, value, registry)
            return
        check_import_form(key, value)

    def check(self) -> None:
        require(len(self.hidden_sizes) >= 1 and all(1 <= h <= HIDDEN_MAX for h in self.hidden_sizes),
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
    name: str = setting("adamw", "", OPTIMIZERS)
    lr: float = setting(1e-3, "learning rate (OneCycleLR overrides it with sched.max_lr / sched.div_factor)", above=0,
                        high=LR_MAX)
    weight_decay: float = setting(0.01, "weight decay (decoupled for adamw)", low=0, high=10)
    momentum: float = setting(0.9, "sgd momentum", low=0, below=1)
    nesterov: bool = setting(False, "sgd Nesterov momentum (needs momentum > 0)")
    betas: List[float] = setting([0.9, 0.999], "adam/adamw betas")
    decay_bn_bias: bool = setting(True, "weight decay on BatchNorm and bias parameters (every 1-d parameter) too; "
                                        "false = decay only the weight matrices and convolution kernels")
    bn_bias_lr_scale: float = setting(1.0, "learning-rate multiplier of BatchNorm and bias parameters (every 1-d "
                                           "parameter), applied through every schedule", above=0, high=LR_MAX)
    bn_bias_scope: BnBiasScope = setting(BnBiasScope("1d"), "which parameters decay_bn_bias and bn_bias_lr_scale "
                                                            "apply to: 1d (every 1-d parameter: normalization "
                                                            "weights and biases, every bias) | norm (the "
                                                            "normalization layers' own: BatchNorm, GroupNorm, "
                                                            "LayerNorm, InstanceNorm; other biases train as the "
                                                            "weights do, as in the speed records)")
    decoupled_decay: bool = setting(False, "sgd, adamw: optim.weight_decay is the fraction of each weight decayed per "
                                           "step at the peak learning rate (sched.max_lr for onecycle and triangle, "
                                           "else optim.lr), the same for every param group whatever its learning "
                                           "rate (bn_bias_lr_scale scales the learning rate, not the decay); the "
                                           "decay follows the schedule's shape. torch gets weight_decay / the "
                                           "group's peak learning rate: the speed records' form")

    def check(self) -> None:
        require(not (self.nesterov and self.name == "sgd" and self.momentum == 0), "optim.nesterov",
                self.nesterov, "false when optim.momentum is 0 (Nesterov needs momentum)")
        require(not self.decoupled_decay or self.name in ("sgd", "adamw"), "optim.decoupled_decay",
                self.decoupled_decay, "false with optim.name=" + self.name + " (sgd and adamw apply their weight "
                "decay as a step on the weights; adam adds it to the gradient, which its normalization rescales)")
        betas = list(self.betas)
        require(len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", betas,
                "two floats in [0, 1)")


@dataclass
class SchedConfig(Section):
    key: ClassVar[str] = "sched"
    name: str = setting("onecycle", "(onecycle and triangle step every batch, plateau on val_loss, the rest every "
                        "epoch)", SCHEDULES)
    step_size: int = setting(30, "step: epochs between decays", low=1, high=EPOCHS_MAX)
    gamma: float = setting(0.1, "step / exponential: decay factor", above=0, high=1)
    t_max: int = setting(0, "cosine: period in epochs (0 = train.epochs)", low=0, high=EPOCHS_MAX,
                        note="0 = train.epochs")
    eta_min: float = setting(0.0, "cosine: lowest learning rate", low=0, high=LR_MAX)
    max_lr: float = setting(0.01, "onecycle / triangle: peak learning rate", above=0, high=LR_MAX)
    pct_start: float = setting(0.3, "onecycle / triangle: fraction of steps spent warming up", above=0, below=1)
    start_factor: float = setting(0.2, "triangle: learning rate at the first step, as a fraction of max_lr", low=0,
                                  high=1)
    end_factor: float = setting(0.07, "triangle: learning rate at the last step, as a fraction of max_lr", low=0,
                                high=1)
    div_factor: float = setting(25.0, "onecycle: initial lr = max_lr / div_factor", above=0, high=1e6)
    final_div_factor: float = setting(1e4, "onecycle: final lr = initial lr / final_div_factor",
                                      above=0, high=1e9)
    plateau_factor: float = setting(0.1, "plateau: factor applied when val_loss stops improving", above=0, below=1)
    plateau_patience: int = setting(10, "plateau: epochs without improvement before reducing", low=0,
                                   high=EPOCHS_MAX)
    min_lr: float = setting(0.0, "plateau: lower bound on the learning rate", low=0, high=LR_MAX)


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def total_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps in a run of `epochs` (a fraction included): epochs x steps per epoch rounded up, as the speed
    records count them (9.9 x 48 -> 476), at least one. (Rounded to 9 decimals first: 0.3 x 10 is 3.0000000000000004
    in binary, and 3 steps.)"""
    return max(1, math.ceil(round(epochs * steps_per_epoch, 9)))


@dataclass
class TrainConfig(Section):
    key: ClassVar[str] = "train"
    epochs: float = setting(100.0, "number of passes over the training set; a fraction (9.9) ends the last epoch "
                                   "early, after epochs x steps per epoch steps in all, rounded up (validated, saved "
                                   "and counted as an epoch)", above=0, high=EPOCHS_MAX, what="a number")
    batch_size: int = setting(128, "training batch size per process (global batch = batch_size x world size)", low=1,
                             high=BATCH_MAX)
    eval_batch_size: int = setting(0, "evaluation batch size (0 = train.batch_size)", low=0,
                                  high=BATCH_MAX, note="0 = train.batch_size")
    seed: int = setting(42, "seed of weights, shuffling and augmentation (0 to 2147483647)", low=0, high=SEED_MAX)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (auto = cuda when available)")
    limit_train_batches: int = setting(0, "stop each epoch after this many batches (0 = whole epoch)", low=0,
                                       high=STEPS_MAX, note="0 = whole epoch")
    log_every: int = setting(50, "log the mean loss and images/s every N steps (one host sync each)", low=1,
                            high=STEPS_MAX)
    grad_clip: float = setting(0.0, "clip the gradient norm to this value (0 = off)", low=0, high=1e6,
                               note="0 = off")
    precision: PrecisionName = setting(PrecisionName.fp32, "fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, "
                                                           "CUDA only)")
    tf32: bool = setting(True, "allow TF32 matmuls and convolutions on CUDA")
    channels_last: bool = setting(False, "model and input batches in channels_last memory format")
    compile: CompileMode = setting(CompileMode.off, "torch.compile mode: off | default | reduce-overhead | "
                                                    "max-autotune")
    capture: bool = setting(False, "compile the whole training step (forward, loss, backward, gradient all-reduce, "
                                   "optimizer, running sums) and on CUDA replay it as one CUDA graph: the host's "
                                   "cost per step becomes a few launches; needs train.compile=default or "
                                   "max-autotune, optim adam/adamw, precision fp32/bf16")
    deterministic: bool = setting(False, "deterministic algorithms only (torch.use_deterministic_algorithms, no "
                                         "cuDNN autotuning, CUBLAS_WORKSPACE_CONFIG set): bitwise repeatable on a GPU, "
                                         "slower")
    peak_tflops: float = setting(0.0, "the device's peak TFLOP/s for MFU (0 = fasttrain's table of known GPUs; "
                                      "no MFU where unknown, e.g. CPUs)", low=0, high=100_000,
                                 note="0 = known GPUs")
    stop_after_steps: int = setting(0, "stop with a resumable checkpoint once this many optimizer steps are done in "
                                       "all (0 = train every epoch); the schedule still spans train.epochs, so a "
                                       "later resume=auto continues it exactly", low=0, high=STEPS_MAX,
                                   note="0 = no early stop")
    label_smoothing: float = setting(0.0, "label smoothing of the training loss (0 = off); validation reports the "
                                          "plain cross-entropy", low=0, below=1, what="a fraction")
    loss_reduction: LossReduction = setting(LossReduction.mean, "the loss whose gradient a step takes: mean (over "
                                            "the batch) | sum (over the global batch, batch_size x world size: the "
                                            "speed records state their learning rates for it); the logged loss is "
                                            "the mean either way")
    ema_decay: float = setting(0.0, "keep an exponential moving average of the weights with this decay per update "
                                    "(0 = off; e.g. 0.99): validation, best.pt's choice and fasttrain eval use the "
                                    "averaged weights; checkpoints hold both", low=0, below=1, what="a fraction")
    ema_every: int = setting(1, "update the weight average every N optimizer steps", low=1,
                            high=STEPS_MAX)
    lookahead_k: int = setting(0, "lookahead: every k optimizer steps the slow weights move lookahead_alpha of the "
                                  "way to the trained ones, and training continues from them (0 = off)", low=0,
                               high=STEPS_MAX, note="0 = off")
    lookahead_alpha: float = setting(0.5, "lookahead: how far the slow weights move at each sync", above=0, high=1,
                                     what="a fraction")
    lookahead_power: float = setting(0.0, "lookahead: > 0 makes alpha move from 1 at the first step to "
                                          "lookahead_alpha at the last, as 1 - (1 - lookahead_alpha) x "
                                          "(step / steps) ^ power (the speed records: alpha 0.2262, power 3); "
                                          "0 = lookahead_alpha throughout", low=0, high=10, note="0 = constant")
    lookahead_end: LookaheadEnd = setting(LookaheadEnd.fast, "lookahead: the weights a run ends with: fast (the "
                                                             "trained ones) | slow (at the last step the trained "
                                                             "weights are set to the slow ones, the steps since the "
                                                             "last sync dropped) | epoch (so at the end of every "
                                                             "epoch too, once started: the speed records' loop)")
    lookahead_start: float = setting(0.0, "lookahead: the epochs trained before it starts; the first sync after "
                                          "them takes the slow weights as a copy of the trained ones (the speed "
                                          "records: 3); 0 = from the first step, the slow weights starting as the "
                                          "initial ones", low=0, high=EPOCHS_MAX, what="a number of epochs",
                                     note="0 = from the start")
    tta: TtaName = setting(TtaName.none, "test-time augmentation of validation and fasttrain eval: none | flip (the "
                                         "mean of the logits of each image and its mirror) | flip_shift (and of the "
                                         "image shifted one pixel up-left and down-right and their mirrors: 6 views, "
                                         "weighted 1/4, 1/4 and 1/8 each as the speed records publish)")
    eval_every: int = setting(1, "validate every N epochs; the last epoch always validates (the epochs between have "
                                 "no val_* values, and best.pt is chosen among validated epochs)", low=1,
                             high=EPOCHS_MAX)
    target_acc: float = setting(0.0, "stop once validation accuracy reaches this fraction (0 = off), recording the "
                                     "time from process start and the steps it took", low=0, high=1,
                                what="a fraction", note="0 = off")
    compile_cache: str = setting("", "folder of torch.compile's caches (Inductor's compiled graphs, AOTAutograd's): "
                                     "'' = PyTorch's default ($TORCHINDUCTOR_CACHE_DIR, else "
                                     "/tmp/torchinductor_<user>), off = compile from scratch, or a folder (e.g. on "
                                     "a shared file system, so every node of a cluster starts warm)")

    def epoch_count(self) -> int:
        """The epochs that start: train.epochs rounded up (9.9 -> 10; the last one is cut short)."""
        return math.ceil(self.epochs)

    def total_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps in the whole run: epochs x steps per epoch rounded up, at least one."""
        return total_steps(self.epochs, steps_per_epoch)

    def lookahead_start_step(self, steps_per_epoch: int) -> int:
        """The step lookahead starts after: train.lookahead_start epochs of steps, rounded up (0: none)."""
        return math.ceil(round(self.lookahead_start * steps_per_epoch, 9))

    def steps_in_epoch(self, epoch: int, steps_per_epoch: int) -> int:
        """Steps of epoch `epoch` (1-based): all of them, but in the last of a fractional count."""
        return min(steps_per_epoch, self.total_steps(steps_per_epoch) - (epoch - 1) * steps_per_epoch)

    def check(self) -> None:
        require(bool(_DEVICE_RE.match(self.device)), "train.device", self.device, "auto, cpu, cuda or cuda:N")
        require(self.lookahead_end == "fast" or self.lookahead_k > 0, "train.lookahead_end", str(self.lookahead_end),
                "fast when train.lookahead_k=0 (there are no slow weights to end on): set train.lookahead_k too")
        require(self.lookahead_start == 0 or self.lookahead_k > 0, "train.lookahead_start", self.lookahead_start,
                "0 when train.lookahead_k=0 (there is no lookahead to start): set train.lookahead_k too")


@dataclass
class DistConfig(Section):
    key: ClassVar[str] = "dist"
    backend: BackendName = setting(BackendName.auto, "auto | nccl | gloo (auto = nccl on CUDA, gloo on CPU)")
    timeout_s: int = setting(1800, "seconds a collective may wait for the other ranks before failing",
                             low=1, high=10**9, note="seconds")


@dataclass
class CheckpointConfig(Section):
    key: ClassVar[str] = "checkpoint"
    every_steps: int = setting(0, "also write a resumable checkpoint every N optimizer steps, mid-epoch included "
                                  "(0 = at epoch ends only)", low=0, high=STEPS_MAX,
                              note="0 = epoch ends")
    keep: int = setting(3, "how many of those step checkpoints to keep (the newest; last.pt and best.pt are kept "
                           "apart)", low=1, high=10_000)
    signals: List[SignalName] = setting([SignalName.SIGTERM, SignalName.SIGUSR1],
                                        "signals that mean 'preempted': the run saves a checkpoint at the next step "
                                        "boundary on every rank and exits with code 75 ([] = none)")
    signal_check_every: int = setting(0, "0 = the ranks agree on the preemption flag at every log interval, inside "
                                         "the reduction that runs there anyway (stop within train.log_every steps); "
                                         "N = also every N steps, with one small CPU collective of its own",
                                      low=0, high=STEPS_MAX, note="0 = at log intervals only")
    every_epochs: int = setting(1, "write last.pt (and best.pt when validation improved) every N epochs; the last "
                                   "epoch always", low=1, high=EPOCHS_MAX)
    background: bool = setting(True, "write epoch and periodic checkpoints from a background thread once the state "
                                     "is copied to host memory, while training goes on (the next save waits for "
                                     "it); preemption, Ctrl-C and the run's last save stay synchronous")


@dataclass
class OutputConfig(Section):
    key: ClassVar[str] = "output"
    dir: str = setting("", "run folder (empty = runs/<output.name>, or runs/<config name>-<timestamp>)")
    name: str = setting("", "run name: the run folder is runs/<name> when output.dir is empty")
    save_checkpoints: bool = setting(True, "write checkpoints/best.pt and checkpoints/last.pt")
    overwrite: bool = setting(False, "with resume=none: allow a run folder that already holds checkpoints to be "
                                     "started over (its checkpoints are replaced)")
    tensorboard: bool = setting(False, "also write TensorBoard event files to <output.dir>/tensorboard "
                                       "(needs the tensorboard package)")
    plots: bool = setting(True, "draw curves.png, throughput.png and time.png at the end of the run (false: skip "
                                "matplotlib, about a second of every run's end on a CPU; `fasttrain plot` draws them later)")

    def check(self) -> None:
        require("/" not in self.name and self.name not in (".", ".."), "output.name", self.name,
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
    resume: str = setting("none", "none (start fresh) | auto (the newest valid checkpoint in output.dir, or fresh "
                                  "when it has none) | PATH (that checkpoint file)")

    def __post_init__(self) -> None:
        require(bool(self.resume), "resume", self.resume, "none, auto or the path of a checkpoint file")
        # RandomCrop pads each side by aug.crop_padding: more than the image side crops padding only
        side = self.data.image_size or DATASET_SIDES.get(self.data.dataset, 0)
        which = (f"data.image_size={side}" if self.data.image_size else f"the image side of data.dataset="
                 f"{self.data.dataset}" if side else f"the largest data.image_size; data.dataset={self.data.dataset}'s "
                 f"own side is known once its images are read")
        require(self.aug.crop_padding <= (side or IMAGE_SIDE_MAX), "aug.crop_padding", self.aug.crop_padding,
                f"an integer in [0, {side or IMAGE_SIDE_MAX}] ({which}): set a smaller aug.crop_padding, or 0 for "
                f"no crop")
        # a mirror image of the border needs that many pixels inside: reflect pads by less than the side
        require(self.aug.crop_padding_mode != "reflect" or not side or self.aug.crop_padding < side,
                "aug.crop_padding", self.aug.crop_padding, f"an integer in [0, {side - 1}] with "
                f"aug.crop_padding_mode=reflect ({which}): set a smaller aug.crop_padding, or crop_padding_mode=zeros")
        if self.train.capture:
            require(self.train.compile in ("default", "max-autotune"), "train.compile", self.train.compile,
                    "default or max-autotune with train.capture=true (the captured step is compiled; "
                    "reduce-overhead would record CUDA graphs of its own inside it)")
            require(self.train.precision != "fp16", "train.precision", self.train.precision,
                    "fp32 or bf16 with train.capture=true (fp16's GradScaler decides on the host whether to "
                    "step; bf16 needs no scaler)")
            require(self.optim.name in CAPTURABLE_OPTIMIZERS, "optim.name", self.optim.name,
                    f"{', '.join(CAPTURABLE_OPTIMIZERS)} with train.capture=true (the captured step reads their "
                    f"learning rate, betas and momentum from device tensors that the schedule updates)")

