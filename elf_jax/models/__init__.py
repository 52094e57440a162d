"""Model zoo: Flax Linen networks (NHWC) with declared ELF front/rear splits.

``get_model(name, num_classes, **overrides)`` builds a network; ``list_models()`` lists the
names. Every network applies as ``net.apply(v, x, train=False)``; splittable ones also as
``method=net.front`` / ``method=net.rear`` with ``__call__ == rear(front(x))`` exactly.
See ``registry.py`` for overrides and each family's module for its parameter-tree names;
``adapter.py`` for ELF on a front whose shape differs from the teacher feature.
"""

from elf_jax.models.adapter import Adapted, FeatureAdapter, adapt
from elf_jax.models.alexnet import AlexNet
from elf_jax.models.convnet import ConvNet
from elf_jax.models.lenet import LeNet
from elf_jax.models.mlp import MLP
from elf_jax.models.registry import (
    canonical_name, count_params, front_shape, get_model, init_shapes, list_models, model_info,
)
from elf_jax.models.resnet import ResNet
from elf_jax.models.vgg import VGG
from elf_jax.models.vit import ViT

__all__ = [
    "get_model", "list_models", "model_info", "canonical_name", "count_params", "init_shapes",
    "front_shape", "adapt", "Adapted", "FeatureAdapter", "AlexNet", "ConvNet", "LeNet", "MLP", "ResNet", "VGG", "ViT",
]
