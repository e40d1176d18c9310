"""Data: the synthetic relation task, CIFAR/ImageFolder datasets and the Lightning DataModule."""


class DataError(ValueError):
    """A data problem the user can fix (bad setting, missing or unreadable files). The CLI prints
    its message without a traceback. Defined before the submodule imports below, which use it."""


from .synthetic import SyntheticRelations  # noqa: E402
from .datasets import ImageFolderDataset, cifar  # noqa: E402
from .datamodule import DATASETS, ImageDataModule  # noqa: E402

__all__ = ["DataError", "SyntheticRelations", "ImageFolderDataset", "cifar", "ImageDataModule", "DATASETS"]
