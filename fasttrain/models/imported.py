"""Models from outside the registry: `model.name=torchvision:<name>` and `package.module:callable`.

The config has checked the syntax; here they are imported and called, and each way of getting them
wrong is one ConfigError line that says what was not found, the closest names that exist, and what
model.name accepts. `check_output` runs one forward pass of two images so that a model that does not
fit the data fails before training, not in its first step.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import pkgutil
import sys
from typing import Any, Callable, Dict, List

import torch
from torch import nn

from fasttrain.config import TORCHVISION_PREFIX, check_not_stdlib, model_names_accepted
from fasttrain.errors import ConfigError, UserError


# the module of a class defined in the script that called fasttrain.fit (or in a notebook): recorded as
# model.name, and importable by no other process (there, __main__ is fasttrain's own entry point)
SCRIPT_MODULE = "__main__"
SMALL_IMAGE_SIDE = 64  # ResNets get the small-image stem up to this image side


def torchvision_model(name: str, kwargs: Dict[str, Any], in_channels: int, image_size: int,
                      num_classes: int) -> nn.Module:
    """torchvision's classification model `name` (one of torchvision.models.list_models(module=
    torchvision.models)), built with weights=None (nothing is downloaded: the weights are random) and
    num_classes from the dataset; model.kwargs go to its builder too and win (e.g. dropout, or
    image_size for the vit_* models, which otherwise expect 224x224 images). Adapted to the data:

    - ResNet family (resnet*, resnext*, wide_resnet*) on images of 64 pixels a side or fewer (CIFAR-10,
      MNIST): conv1 becomes a 3x3 convolution with stride 1 and padding 1 (in_channels inputs, 64
      outputs, no bias) and the max-pool after it is removed, the usual CIFAR stem, so that a 32x32
      image reaches the last stage as 4x4 rather than 1x1. Larger images keep the 7x7 stride-2 stem.
    - Any model, when in_channels is not 3 (MNIST: 1): its first convolution takes in_channels
      inputs, with the same kernel, stride, padding and outputs.
    A replaced convolution's weights are drawn from a normal distribution with the original's
    standard deviation times sqrt(original fan-in / new fan-in), so that its outputs keep the variance
    the model's own initialisation gave them; its bias, if any, is kept. Nothing else changes: other
    families keep their stem (their first layers shrink 32x32 images fast) and the sizes they need.
    """
    import torchvision  # only for these models: it adds a second to every start

    known = torchvision.models.list_models(module=torchvision.models)  # classification only, no detection etc.
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(f"config error: model.name='{TORCHVISION_PREFIX}{name}': torchvision "
                          f"{torchvision.__version__} has no classification model {name!r}"
                          + (f"; did you mean {' or '.join(close)}?" if close else "")
                          + f" ({len(known)} accepted: torchvision.models.list_models(module=torchvision.models))")
    if "weights" in kwargs:
        raise ConfigError(f"config error: model.kwargs.weights={kwargs['weights']!r} is not valid: torchvision models "
                          f"are built with weights=None (fasttrain downloads no weights); remove it")
    arguments = {"num_classes": num_classes, **kwargs}
    model = _call(TORCHVISION_PREFIX + name, functools.partial(torchvision.models.get_model, name, weights=None),
                  arguments)
    if isinstance(model, torchvision.models.ResNet) and image_size <= SMALL_IMAGE_SIDE:
        model.conv1 = _redrawn_conv(model.conv1, in_channels, kernel_size=3, stride=1, padding=1)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        conv_name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), ("", None))
        if conv is None or conv.in_channels != 3 or conv.groups != 1:
            raise ConfigError(f"config error: model.name='{TORCHVISION_PREFIX}{name}' cannot take "
                              f"{in_channels}-channel images: its first layer is not a 3-channel convolution")
        parent_name, _, child_name = conv_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name,
                _redrawn_conv(conv, in_channels, conv.kernel_size, conv.stride, conv.padding))
    return model


def _redrawn_conv(conv: nn.Conv2d, in_channels: int, kernel_size: Any, stride: Any, padding: Any) -> nn.Conv2d:
    """A convolution like `conv` (outputs, dilation, bias) with these inputs and geometry, its weights at
    the scale of conv's initialisation per fan-in (see torchvision_model)."""
    new = nn.Conv2d(in_channels, conv.out_channels, kernel_size, stride, padding, dilation=conv.dilation,
                    bias=conv.bias is not None)
    fan_in_ratio = conv.weight[0].numel() / new.weight[0].numel()
    with torch.no_grad():
        new.weight.normal_(0.0, float(conv.weight.std()) * math.sqrt(fan_in_ratio))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def imported_model(reference: str, kwargs: Dict[str, Any], in_channels: int, image_size: int,
                   num_classes: int) -> nn.Module:
    """Your own model, `package.module:callable` (a class or a function; `module:Outer.attr` walks
    attributes): imported from sys.path (PYTHONPATH; the current folder too under `python -m`) and
    called with the keyword arguments num_classes, in_channels and image_size that its signature
    names (a **kwargs catch-all gets none of them), then model.kwargs, which win."""
    module_name, _, attribute = reference.partition(":")
    if module_name == SCRIPT_MODULE:
        raise UserError(f"model.name={reference!r} is a class that was defined in the script that trained it "
                        f"(fasttrain.fit), which cannot be imported here: name an importable copy of it, "
                        f"model.name=package.module:{attribute}")
    target = _import_attribute(reference)
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    declared = _parameter_names(target)
    arguments = {key: value for key, value in shape.items() if key in declared} | dict(kwargs)
    return _call(reference, target, arguments)


def check_importable(name: str) -> None:
    """An import-path model.name (`package.module:callable`) imported and its attribute found, not called: at a
    run's start, so that a wrong path fails in one line before any data is decoded. Other names: nothing."""
    if ":" in name and not name.startswith(TORCHVISION_PREFIX) and not name.startswith(SCRIPT_MODULE + ":"):
        _import_attribute(name)


def _import_attribute(reference: str) -> Callable[..., Any]:
    module_name, _, attribute_path = reference.partition(":")
    check_not_stdlib(reference)  # the config did too; here for a ModelConfig changed after it was checked
    try:
        target: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if module_name != missing and not module_name.startswith(missing + "."):
            # the module exists but imports one that is not installed: that one is what to fix
            raise ConfigError(f"config error: model.name={reference!r}: module {module_name!r} imports "
                              f"{missing!r}, which is not installed") from err
        close = difflib.get_close_matches(missing.rpartition(".")[2], _sibling_modules(missing), n=3)
        raise ConfigError(f"config error: model.name={reference!r}: no module named {missing!r}"
                          + (f"; did you mean {' or '.join(close)}?" if close else "")
                          + f" (modules are imported from PYTHONPATH, and from the current folder under python -m; "
                          f"model.name accepts {model_names_accepted()})") from err
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the user's module ran and failed: whatever it raised
        raise ConfigError(f"config error: model.name={reference!r}: importing module {module_name!r} failed: "
                          f"{type(err).__name__}: {_first_line(err)} (fix that module, or name another)") from err
    where = module_name
    for part in attribute_path.split("."):
        if not hasattr(target, part):
            close = difflib.get_close_matches(part, [n for n in dir(target) if not n.startswith("_")], n=3)
            raise ConfigError(f"config error: model.name={reference!r}: {where!r} has no attribute {part!r}"
                              + (f"; did you mean {' or '.join(close)}?" if close else "")
                              + " (package.module:callable names a class or function in that module)")
        target, where = getattr(target, part), f"{where}:{part}" if where == module_name else f"{where}.{part}"
    if not callable(target):
        raise ConfigError(f"config error: model.name={reference!r} is not callable (it holds a "
                          f"{type(target).__name__}): name a class or function that returns an nn.Module")
    _check_builder_kind(reference, target)
    return target


def _check_builder_kind(reference: str, target: Any) -> None:
    """Only an nn.Module subclass, or a plain Python function of your own, is called: a builtin or a
    standard-library function (os.system, subprocess.call, eval) imported into your module under another
    name would run a command or code with model.kwargs as its arguments, and returns no model anyway."""
    if inspect.isclass(target):
        if issubclass(target, nn.Module):
            return
        what = f"a class that is not an nn.Module subclass ({target.__module__}.{target.__qualname__})"
    elif inspect.isfunction(target):
        home = (getattr(target, "__module__", None) or "").partition(".")[0]
        if home not in sys.stdlib_module_names:
            return
        what = f"the standard-library function {home}.{target.__qualname__}"
    else:
        what = f"a {type(target).__name__}, not a class or a Python function"
    raise ConfigError(f"config error: model.name={reference!r} is {what}: name an nn.Module subclass, or a "
                      f"function of your own that returns one")


def _sibling_modules(dotted: str) -> List[str]:
    """The names of the modules beside `dotted` (in its parent package, or top-level ones): the
    candidates for 'did you mean'."""
    parent_name = dotted.rpartition(".")[0]
    if not parent_name:
        return [m.name for m in pkgutil.iter_modules()]
    try:
        parent = importlib.import_module(parent_name)
    except ImportError:
        return []
    return [m.name for m in pkgutil.iter_modules(getattr(parent, "__path__", []))]


def _parameter_names(target: Callable[..., Any]) -> set:
    """The keyword parameters `target` names (a class: its __init__'s); none when it has no signature."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass model.kwargs only
        return set()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _call(reference: str, target: Callable[..., Any], arguments: Dict[str, Any]) -> nn.Module:
    """target(**arguments), which must return an nn.Module; a TypeError there is what a wrong
    model.kwargs gives (an unexpected or missing argument): one line that shows what was passed."""
    try:
        model = target(**arguments)
    except Exception as err:  # noqa: BLE001 - the model's own constructor: any failure is one line, not a traceback
        # a TypeError is an unexpected or missing argument; ValueError, RuntimeError, ... a value it refused
        passed = ", ".join(f"{key}={value!r}" for key, value in arguments.items()) or "no arguments"
        raise ConfigError(f"config error: model.name={reference!r} called with {passed}: {type(err).__name__}: "
                          f"{_first_line(err)} (model.kwargs sets the arguments)") from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config error: model.name={reference!r} returned a {type(model).__name__}, not a "
                          f"torch.nn.Module: return the model itself")
    return model


def check_parameters(model: nn.Module, name: str) -> None:
    """A model with nothing to train is a mistake (a forward of fixed operations, or parameters all frozen):
    one line here instead of the optimizer's "empty parameter list" traceback."""
    if not any(p.requires_grad for p in model.parameters()):
        held = sum(p.numel() for p in model.parameters())
        raise ConfigError(f"config error: model.name={name!r} has no trainable parameters ({held:,} parameters, "
                          f"none requiring gradients): name a model with layers to train")


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def check_output(model: nn.Module, name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    """A model from outside the registry must map a batch of this dataset's images to one logit per
    class. Checked with one forward of two random images in training mode (the mode it trains in:
    torchvision's googlenet and inception_v3 return a tuple there unless model.kwargs.aux_logits=false),
    then its buffers (BatchNorm statistics) and the CPU random state are put back: building it changes
    nothing. A mismatch is one line here instead of a traceback from the loss at the first step, or a
    model with 1000 outputs trained on 10 classes without a word."""
    saved_buffers = [buffer.detach().clone() for buffer in model.buffers()]
    was_training = model.training
    shape = f"2x{in_channels}x{image_size}x{image_size}"
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.train()
            logits = model(torch.randn(2, in_channels, image_size, image_size))
    except Exception as err:  # noqa: BLE001 - the model's own forward: any failure means it does not fit the data
        raise ConfigError(f"config error: model.name={name!r} fails on a batch of {shape} images: "
                          f"{type(err).__name__}: {_first_line(err)} (model.kwargs passes it arguments, such as "
                          f"the image_size a ViT expects)") from err
    finally:
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), saved_buffers):
                buffer.copy_(saved)
        model.train(was_training)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"config error: model.name={name!r} returns a {type(logits).__name__} in training mode, "
                          f"expected a tensor of logits (torchvision's googlenet and inception_v3 return their "
                          f"auxiliary outputs too unless model.kwargs.aux_logits=false)")
    if tuple(logits.shape) != (2, num_classes):
        raise ConfigError(f"config error: model.name={name!r} gives logits of shape {tuple(logits.shape)} for a batch "
                          f"of {shape} images, expected (2, {num_classes}), one per class (declare a num_classes "
                          f"parameter, or set model.kwargs)")
