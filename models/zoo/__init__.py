"""The model zoo: importing this package registers every family's factories."""
from __future__ import annotations

from models.zoo import (  # noqa: F401  (imported for their @register_model side effects)
    cifar_resnet,
    mobilenetv2,
    resnet50_cifar,
    shufflenetv1,
    shufflenetv2,
    torchvision_models,
    vgg,
    wrn,
)
