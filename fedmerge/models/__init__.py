"""Model zoo: the architectures fedmerge trains, aligns and merges."""

from fedmerge.models.cnn import SimpleCNN
from fedmerge.models.factory import MODEL_NAMES, build_model
from fedmerge.models.mlp import MLP
from fedmerge.models.resnet import ResNet20
from fedmerge.models.vgg import VGG11

__all__ = ["MLP", "MODEL_NAMES", "VGG11", "ResNet20", "SimpleCNN", "build_model"]
