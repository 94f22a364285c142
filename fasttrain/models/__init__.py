"""Models: the tutorial's, torchvision's, and your own, built by the name model.name gives.

tutorial.py  the tutorial's models (SimpleModel, MLP, MLPSequential, CNN, CIFAR10_CNN), each registered by name
speedrun.py  SpeedNet, the CIFAR-10 speed records' network (its whitening layer set from the data)
imported.py  torchvision:<name> and package.module:callable: imported, called, and checked against the data
build.py     build_model (a registered name or one of the two import forms); the summary a run logs
"""

from fasttrain.models.build import build_model, count_parameters, summarize
from fasttrain.models.imported import SCRIPT_MODULE, check_output, imported_model, torchvision_model
# the tutorial's first: registration order is the order --help and error messages list the names in
from fasttrain.models.tutorial import CIFAR10_CNN, CNN, MLP, ConvBlock, SimpleModel, mlp_layers, mlp_sequential
from fasttrain.models.speedrun import SpeedNet, Whitening  # after the tutorial's, on purpose

__all__ = ["CIFAR10_CNN", "CNN", "MLP", "SCRIPT_MODULE", "ConvBlock", "SimpleModel", "build_model", "check_output",
           "count_parameters", "imported_model", "mlp_layers", "mlp_sequential", "SpeedNet", "summarize",
           "torchvision_model", "Whitening"]
