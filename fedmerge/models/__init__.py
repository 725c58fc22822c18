"""Model zoo: the architectures fedmerge trains, aligns and merges, and a user's own."""

from fedmerge.models.cnn import SimpleCNN
from fedmerge.models.config import ModelConfig
from fedmerge.models.factory import (
    MODEL_NAMES,
    build_model,
    build_model_from_config,
    example_input,
    model_names,
    register_model,
)
from fedmerge.models.mlp import MLP
from fedmerge.models.resnet import ResNet20
from fedmerge.models.user import ModelBuilder, load_factory
from fedmerge.models.vgg import VGG11

__all__ = [
    "MLP",
    "MODEL_NAMES",
    "VGG11",
    "ModelBuilder",
    "ModelConfig",
    "ResNet20",
    "SimpleCNN",
    "build_model",
    "build_model_from_config",
    "example_input",
    "load_factory",
    "model_names",
    "register_model",
]
