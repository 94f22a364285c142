"""fasttrain: train CIFAR-10 image classifiers as fast as the hardware allows.

From Python (the same run as `python -m fasttrain.run`; see fasttrain.api):

    import fasttrain
    result = fasttrain.fit("configs/smoke.yaml", model=MyNet(), overrides=["train.epochs=2"])

`fit`, `Trainer` and `FitResult` are imported on first use, so that `import fasttrain` stays light
(no torch): the entry point holds preemption signals before the heavy imports start.
"""

from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

__all__ = ["FitResult", "Trainer", "__version__", "fit"]
_API = ("FitResult", "Trainer", "fit")  # fasttrain.api's, imported by __getattr__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports it when asked
    from fasttrain.api import FitResult, Trainer, fit


def __getattr__(name: str) -> Any:
    if name in _API:
        from fasttrain import api

        return getattr(api, name)
    raise AttributeError(f"module 'fasttrain' has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted([*globals(), *_API])
