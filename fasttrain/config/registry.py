"""Name -> builder registries: the models, datasets, optimizers and schedules a config may name.

A new entry is one decorated function, in the module that holds its kind or in your own code:

    @MODELS.register("ResNet9")
    def resnet9(cfg: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        ...

after which `model.name=ResNet9` is accepted: the config checks `data.dataset`, `model.name`,
`optim.name` and `sched.name` against these registries (there is no second list of names).

This module imports no torch, so that fasttrain.config can import it. The built-in entries are
registered when their module is imported (fasttrain.models: tutorial.py and speedrun.py, fasttrain.data.datasets,
fasttrain.train.optim); `names()` and `get()` import that module first, so the built-ins are known
whichever module a program imported first. Names keep their registration order, which is the order error messages
and `--help` list them in.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, Iterator, Tuple, TypeVar

from fasttrain.errors import ConfigError

Builder = TypeVar("Builder", bound=Callable[..., object])


class Registry(Generic[Builder]):
    """Builders by name, for the config key `key`; the built-ins are registered by module `home`."""

    def __init__(self, key: str, home: str) -> None:
        self.key = key
        self._home = home
        self._builders: Dict[str, Builder] = {}

    def register(self, name: str) -> Callable[[Builder], Builder]:
        """A decorator that registers its function under `name` and returns it unchanged."""

        def add(builder: Builder) -> Builder:
            if name in self._builders:  # two entries under one name: the second would silently win
                raise ValueError(f"{self.key}: {name!r} is already registered ({self._builders[name].__qualname__})")
            self._builders[name] = builder
            return builder

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry (a test's, or one to replace)."""
        del self._builders[name]

    def names(self) -> Tuple[str, ...]:
        importlib.import_module(self._home)  # registers the built-ins on first use; a dict look-up after
        return tuple(self._builders)

    def get(self, name: str) -> Builder:
        """The builder registered as `name`; a ConfigError naming the accepted names otherwise."""
        names = self.names()
        if name not in names:
            raise ConfigError(f"config error: {self.key}={name!r} is not valid: expected one of {', '.join(names)}")
        return self._builders[name]

    def is_builtin(self, name: str) -> bool:
        """Whether `name` is one of fasttrain's own entries (registered by its home module), not one added
        by your code."""
        module = self.get(name).__module__
        return module == self._home or module.startswith(self._home + ".")

    # a collection of names, as the config's fixed tuples were
    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())


# builders: (DataConfig, train) -> (images, labels, classes); see fasttrain.data.datasets
DATASETS: Registry[Callable[..., Tuple]] = Registry("data.dataset", "fasttrain.data.datasets")
# builders: (ModelConfig, in_channels, image_size, num_classes) -> nn.Module; see fasttrain.models.tutorial and
# fasttrain.models.speedrun
MODELS: Registry[Callable[..., object]] = Registry("model.name", "fasttrain.models")  # tutorial.py, speedrun.py
# builders: (OptimConfig, params, kernels) -> torch.optim.Optimizer; see fasttrain.train.optim
OPTIMIZERS: Registry[Callable[..., object]] = Registry("optim.name", "fasttrain.train.optim")
# builders: (SchedConfig, optimizer, epochs, steps_per_epoch) -> optim.Stepping; see fasttrain.train.optim
SCHEDULES: Registry[Callable[..., object]] = Registry("sched.name", "fasttrain.train.optim")
