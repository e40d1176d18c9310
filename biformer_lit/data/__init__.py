"""Data: the synthetic relation task, CIFAR/ImageFolder datasets and the Lightning DataModule."""
from .datamodule import DATASETS, ImageDataModule
from .datasets import ImageFolderDataset, cifar
from .synthetic import SyntheticRelations

__all__ = ["SyntheticRelations", "ImageFolderDataset", "cifar", "ImageDataModule", "DATASETS"]
