"""The model families and their registry.

Each family is one module: :mod:`nin.models.nin` (Network in Network: the chapter's ``nin_d2l``, the
paper's ``nin_cifar10``, ``nin28``) and :mod:`nin.models.classic` (the chapter's LeNet, AlexNet and
VGG-11 baselines). A family writes its architectures as data (:mod:`nin.models.specs` stages), builds
them with one private builder, and registers one-line factories (:mod:`nin.models.registry`).
:mod:`nin.models.init` initializes weights; :mod:`nin.models.fold` folds BatchNorm for inference.

To add a model: write its spec and a registered factory in its family's module.
"""

from nin.models import classic, nin  # noqa: F401  (importing a family registers its models)
from nin.models.init import init_weights
from nin.models.nin import DEFAULT_MODEL
from nin.models.registry import MODELS, ModelEntry, Registry, create_model, list_models, model_entry, register_model

__all__ = ["DEFAULT_MODEL", "MODELS", "ModelEntry", "Registry", "create_model", "init_weights", "list_models",
           "model_entry", "register_model"]
