"""biformer-lit: BiFormer and controlled attention ablations on PyTorch Lightning.

Importing the package registers the models with timm: timm.create_model("biformer_tiny").
"""
from . import attention, models  # noqa: F401

__version__ = "0.1.0"
