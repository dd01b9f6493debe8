"""nin: Network-in-Network image classifiers (Lin, Chen & Yan, 2013) in PyTorch."""

from nin.errors import NinError
from nin.models import create_model, list_models
from nin.models.nin import NiN, nin_block

__all__ = ["NiN", "NinError", "create_model", "list_models", "nin_block"]
__version__ = "0.1.0"
