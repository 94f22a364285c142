"""Train from Python: `fasttrain.fit(config, model=..., overrides=[...])` and `fasttrain.Trainer`.

    import fasttrain
    result = fasttrain.fit("configs/smoke.yaml", model=MyNet(), overrides=["train.epochs=2"])
    print(result.best_val_acc, result.run_dir)

The same path as `python -m fasttrain.run`, not a second loop: the config is loaded and checked by
`fasttrain.config`, then `fasttrain.train.lifecycle.train` joins the process group (world size 1, or the
ranks that torchrun / srun / accelerate launch started), claims the run folder, builds, resumes
(`resume=auto|PATH`) and trains, with the same checkpoints, records and signal handling. A module
passed as `model` is trained in place of the config's, and model.name becomes its class's import path
(`package.module:Class`, the form the command line accepts too), registered in `MODELS` for the duration
of the call: config.yaml and every checkpoint say which model was trained, `resume=auto` with the same
class continues, and `fasttrain eval` rebuilds it from there when that class can be imported.

What the command line does for its whole process is undone when `fit` returns or raises: signal
handlers, logging handlers and filters, the process group, deterministic-algorithm, cuDNN and TF32
switches, the torch.compile settings it changes, the current CUDA device and environment variables; so a
script can call `fit` again. The random generators stay as the run left them (it seeds them, as the CLI does).
Bad input raises the CLI's one-line `UserError` (`ConfigError` for config keys and values) instead
of exiting; a Ctrl-C stops at the next log interval with a checkpoint, then raises KeyboardInterrupt.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as torch_dist
from torch import nn

from fasttrain import config as config_mod
from fasttrain.dist import preemption
from fasttrain.observe import timing
from fasttrain.checkpoint import RunState
from fasttrain.config import Config
from fasttrain.errors import ConfigError, UserError
from fasttrain.observe.logs import LOGGER_NAME

ConfigSource = Union[None, str, "os.PathLike[str]", Config]
Overrides = Union[Sequence[str], Mapping[str, Any], None]  # None: no overrides


@dataclass(frozen=True)
class FitResult:
    """What a fit did, as values: the same on every rank. The files are in `run_dir` (see the README's
    "What a run writes"): `metrics_path` holds `history`, one record per epoch."""
    run_dir: Path  # output.dir, absolute
    # the config as fit loaded it, model.name set to the module's class (config.yaml also records what the run
    # derived from it, such as data.loader=auto's choice)
    config: Config = field(repr=False)
    epoch: int  # completed epochs, a resumed run's earlier ones included
    global_step: int  # optimizer steps done
    best_val_acc: Optional[float]  # a fraction; None when no epoch finished
    best_epoch: Optional[int]
    final_val_acc: Optional[float]  # of the last completed epoch
    stopped_by: Optional[str]  # None: every epoch trained; "stop_after_steps"; a signal's name: preempted
    last_checkpoint: Optional[Path]  # what the run wrote last, absolute (None: nothing written)
    history: List[Dict[str, Any]] = field(repr=False)  # the epoch records of metrics.jsonl
    finished_by: Optional[str] = None  # "target_acc": train.target_acc was reached before the last epoch
    time_split: Dict[str, Any] = field(default_factory=dict, repr=False)  # env.json's: where the wall time went

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def best_checkpoint(self) -> Optional[Path]:
        best = self.run_dir / "checkpoints" / "best.pt"
        return best if best.is_file() else None

    @property
    def exit_code(self) -> int:
        """What `python -m fasttrain.run` would exit with: 0, or 75 when preempted (a job script
        requeues on it; `sys.exit(result.exit_code)` keeps that contract)."""
        preempted = self.stopped_by is not None and self.stopped_by != "stop_after_steps"
        return preemption.EXIT_PREEMPTED if preempted else 0


class Trainer:
    """A run's config, loaded and checked when the Trainer is made (bad keys fail here, before any
    work), and `fit(model)` to train it. This is the front for scripts; the epochs themselves are run
    by `fasttrain.train.session.TrainingSession`, which `fit` builds from the config (with data, optimizer,
    schedule, step and run folder) exactly as the command line does.

    Each `fit` is one run into `config.output.dir`: a second fit of the same Trainer continues the first
    with `resume=auto` and is refused with `resume=none` (as the command line would be)."""

    def __init__(self, config: ConfigSource = None, overrides: Overrides = ()):
        self.config: Config = config_from(config, overrides)

    def fit(self, model: Optional[nn.Module] = None) -> FitResult:
        """Train `model` (any nn.Module that takes the dataset's images and gives one score per class;
        trained in place), or the config's model.name when None. Returns when training ends; raises
        UserError on bad input, KeyboardInterrupt after a Ctrl-C (its checkpoint saved)."""
        _check_model(model)
        if torch_dist.is_available() and torch_dist.is_initialized():
            raise UserError("a process group is already initialized in this process: fasttrain.fit joins one itself "
                            "from the launcher's environment (torchrun, srun, accelerate launch); call fit without "
                            "init_process_group, or destroy_process_group first")
        from fasttrain.train.lifecycle import train  # heavy (data, step, checkpoints): imported once the input is checked

        cfg = self.config
        if model is not None:  # recorded in config.yaml and the checkpoints, in model.name's import form
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=model_path(model)))
        clock = timing.restart("the fit() call")  # this run's time split starts here, not at the process's start
        with _process_state_restored(compiles=cfg.train.compile != "off"):
            preemption.narrow_early_hold(cfg.checkpoint.signals)  # as run.main: others keep their own handling
            try:
                state = train(cfg, model)
            except preemption.PreemptedBeforeStart as stop:  # while waiting for the other ranks: nothing to save
                state = RunState(stopped_by=stop.signal_name)
        if state.stopped_by == preemption.INTERRUPT:
            raise KeyboardInterrupt(f"fasttrain: stopped by Ctrl-C after step {state.global_step}; resume=auto "
                                    f"output.dir={cfg.output.dir} continues from its checkpoint")
        return _result(cfg, state, clock.summary())


def fit(config: ConfigSource = None, model: Optional[nn.Module] = None, overrides: Overrides = ()) -> FitResult:
    """Train as `python -m fasttrain.run --config CONFIG OVERRIDES...` does, with `model` (an nn.Module,
    trained in place) instead of the config's model.name when given; see `Trainer.fit`.

    config: a YAML recipe's path, a `fasttrain.config.Config`, or None (the built-in defaults).
    overrides: `["train.epochs=3", ...]` or `{"train.epochs": 3, ...}`, applied on top of it (None: none)."""
    return Trainer(config, overrides).fit(model)


# --------------------------------------------------------------------------- input


def config_from(config: ConfigSource, overrides: Overrides = ()) -> Config:
    """A checked Config from a path (as `--config`), a Config (a checked copy: the caller's object is not
    changed) or None, with `overrides` on top. An empty output.dir becomes runs/<output.name>, or
    runs/<config name>-<timestamp>, as on the command line."""
    items = _override_items(overrides)
    if config is None or isinstance(config, (str, os.PathLike)):
        return config_mod.load_config(None if config is None else os.fspath(config), items)
    if not isinstance(config, Config):
        raise ConfigError(f"config error: fasttrain.fit's config must be the path of a YAML recipe, a "
                          f"fasttrain.config.Config or None, not {type(config).__name__}")
    cfg = config_mod.from_dict(config_mod.to_dict(config), items)
    if not cfg.output.dir:
        cfg.output.dir = str(Path("runs") / (cfg.output.name or f"run-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    return cfg


def _override_items(overrides: Overrides) -> List[str]:
    """`key.sub=value` strings; a mapping's values written as YAML reads them back (true, [1, 2], 0.001)."""
    if overrides is None:  # the usual Python spelling of "none given" (overrides=None)
        return []
    if isinstance(overrides, str):
        raise ConfigError(f"config error: overrides must be a list of key.sub=value strings (or a dict), not one "
                          f"string: write overrides=[{overrides!r}]")
    if isinstance(overrides, Mapping):
        return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    items = list(overrides)
    wrong = next((item for item in items if not isinstance(item, str)), None)
    if wrong is not None:
        raise ConfigError(f"config error: override {wrong!r} is a {type(wrong).__name__}: overrides are "
                          f"key.sub=value strings (e.g. 'train.epochs=5'), or a dict {{'train.epochs': 5}}")
    return items


def _check_model(model: Any) -> None:
    if model is None or isinstance(model, nn.Module):
        return
    if isinstance(model, type) and issubclass(model, nn.Module):
        raise UserError(f"fasttrain.fit: model={model.__name__} is a class: pass a module, model={model.__name__}()")
    raise UserError(f"fasttrain.fit: model must be a torch.nn.Module (an instance), not {type(model).__name__}")


def model_path(model: nn.Module) -> str:
    """The import path of the module's class, in model.name's package.module:callable form
    ("mypackage.nets:ResNet9", "__main__:Net" for a class defined in the script that calls fit). A class
    defined inside a function ("f.<locals>.Net") has no import path: it is recorded as module:Net, a
    name the config accepts (so its checkpoints load on resume) and that `fasttrain eval` reports as
    not found in its module."""
    cls = type(model)
    name = cls.__name__ if "<locals>" in cls.__qualname__ else cls.__qualname__
    return f"{cls.__module__}:{name}"


def _result(cfg: Config, state: RunState, time_split: Dict[str, Any]) -> FitResult:
    finished = state.best_epoch > 0
    return FitResult(run_dir=Path(cfg.output.dir).absolute(), config=cfg, epoch=state.epoch,
                     global_step=state.global_step, best_val_acc=state.best_val_acc if finished else None,
                     best_epoch=state.best_epoch if finished else None,
                     final_val_acc=state.history[-1]["val_acc"] if state.history else None,
                     stopped_by=state.stopped_by,
                     last_checkpoint=Path(state.last_checkpoint).absolute() if state.last_checkpoint else None,
                     history=list(state.history), finished_by=state.finished_by, time_split=time_split)


# --------------------------------------------------------------------------- the process


# loggers whose handlers, level or filters a run changes: fasttrain's own (its console and train.log; the
# silent one other ranks log to) and the Dynamo logger a captured step filters (train.step._quiet_profiler_notice)
_LOGGERS = (LOGGER_NAME, f"{LOGGER_NAME}.silent", "torch._dynamo.variables.ctx_manager")
# the torch.compile configs a run sets (torch._dynamo.config.optimize_ddp in dist.ddp.wrap_ddp,
# torch._inductor.config.force_disable_caches in compile_cache): restored key by key
_COMPILE_CONFIGS = ("torch._dynamo.config", "torch._inductor.config")


@contextmanager
def _process_state_restored(compiles: bool = True) -> Iterator[None]:
    """Everything `python -m fasttrain.run` sets for the whole process, put back as it was on every exit:
    signal handlers (the early hold, the run's preemption and Ctrl-C handlers, which a stopped run leaves in
    place for a process that is about to exit), the handlers, level and filters of the loggers a run sets up
    (`_LOGGERS`), deterministic algorithms, cuDNN and TF32 switches, the torch.compile configs (`_COMPILE_CONFIGS`:
    read only when the run compiles or they are loaded already; importing Dynamo costs seconds), the current
    CUDA device, and the environment (CUBLAS_WORKSPACE_CONFIG, MASTER_ADDR / MASTER_PORT under srun,
    TORCHINDUCTOR_CACHE_DIR). The trainer itself leaves the process group."""
    main_thread = threading.current_thread() is threading.main_thread()
    numbers = [getattr(signal, name) for name in preemption.CATCHABLE]
    handlers = {number: signal.getsignal(number) for number in numbers} if main_thread else {}
    switches = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
                torch.backends.cuda.matmul.allow_tf32)
    environ = dict(os.environ)
    loggers = {name: _logger_setup(logging.getLogger(name)) for name in _LOGGERS}
    configs = {name: importlib.import_module(name).get_config_copy() for name in _COMPILE_CONFIGS
               if compiles or name in sys.modules}
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else 0  # no CUDA start-up here
    preemption.hold_early_signals()  # as run.main: a preemption signal while the run starts is acted on
    try:
        yield
    finally:
        preemption.release_early_signals()
        for number, handler in handlers.items():
            if handler is not None:  # None: set outside Python, nothing Python can put back
                signal.signal(number, handler)
        deterministic, warn_only, benchmark, cudnn_tf32, matmul_tf32 = switches
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        for name, saved in configs.items():
            config = sys.modules[name]
            now = config.get_config_copy()  # not getattr: reading a deprecated key warns
            for key, value in saved.items():
                if now.get(key) != value:
                    setattr(config, key, value)
        if torch.cuda.is_initialized():
            torch.cuda.set_device(cuda_device)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        for key, value in environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        for name, setup in loggers.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.filters[:], (logger.level, logger.propagate) = setup


def _logger_setup(logger: logging.Logger) -> tuple:
    return list(logger.handlers), list(logger.filters), (logger.level, logger.propagate)
