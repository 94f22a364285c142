"""The tutorial's models: shapes, the case study's parameter count, the registry."""

import pytest
import torch

from fasttrain.errors import ConfigError

from fasttrain.config import MODELS, ModelConfig, load_config
from fasttrain.models import CIFAR10_CNN, MLP, ConvBlock, build_model, count_parameters, mlp_sequential, summarize


def test_cifar10_cnn_has_the_tutorials_parameter_count():
    assert count_parameters(CIFAR10_CNN()) == 815_018


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_every_model_maps_a_batch_to_class_logits(name, channels, size):
    model = build_model(ModelConfig(name=name), channels, size, 10)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


def test_the_config_accepts_exactly_the_registered_models():
    """The built-in models are registered, and model.name is checked against the registry itself."""
    assert {"SimpleModel", "MLP", "MLPSequential", "CIFAR10_CNN"} <= set(MODELS.names())
    for name in MODELS.names():
        assert load_config(None, [f"model.name={name}", "output.dir=unused"]).model.name == name
    with pytest.raises(ConfigError, match="model.name='cifar10_cnn' is not valid"):
        load_config(None, ["model.name=cifar10_cnn", "output.dir=unused"])


def test_mlp_class_and_sequential_versions_are_the_same_network():
    torch.manual_seed(0)
    cls = MLP(3 * 32 * 32, [64, 32], 10)
    seq = mlp_sequential(3 * 32 * 32, [64, 32], 10)
    seq.load_state_dict({k.removeprefix("layers."): v for k, v in cls.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    cls.eval(), seq.eval()
    assert torch.equal(cls(x), seq(x))


def test_conv_block_keeps_the_spatial_size():
    assert ConvBlock(3, 8)(torch.randn(2, 3, 32, 32)).shape == (2, 8, 32, 32)


def test_summary_names_the_parameter_count():
    assert "815,018 parameters" in summarize(CIFAR10_CNN(), "CIFAR10_CNN")
