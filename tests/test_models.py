"""The tutorial's models: shapes, the case study's parameter count, the registry."""

import pytest
import torch

from fasttrain.config import MODELS, ModelConfig
from fasttrain.models import CIFAR10_CNN, MLP, MODEL_REGISTRY, ConvBlock, build_model, count_parameters, mlp_sequential, summarize


def test_cifar10_cnn_has_the_tutorials_parameter_count():
    assert count_parameters(CIFAR10_CNN()) == 815_018


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels,size", [(3, 32), (1, 28)])
def test_every_model_maps_a_batch_to_class_logits(name, channels, size):
    model = build_model(ModelConfig(name=name), channels, size, 10)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


def test_config_choices_match_the_registry():
    assert set(MODELS) == set(MODEL_REGISTRY)


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
