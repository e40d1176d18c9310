"""ImageDataModule: one LightningDataModule for the synthetic task, CIFAR-10/100 and ImageFolder.

Mixup/CutMix are applied by the LightningModule on batches, not here.
"""
import os
from typing import Literal, Optional, get_args

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from ..settings import Seed, Unit, plain
from .datasets import CIFAR, CIFAR_STATS, ImageFolderDataset, cifar, class_folders
from .sampler import EpochSeededDataset, EpochShuffleSampler, EvalShardSampler
from .synthetic import DEFAULT_NUM_CLASSES, SyntheticRelations, check_settings

DatasetName = Literal["synthetic", "cifar10", "cifar100", "imagefolder"]
DATASETS = get_args(DatasetName)
IMAGENET_STATS = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def normalisation_of(hparams: dict):
    """(mean, std) per channel with which a run of these data settings (an ImageDataModule's hyperparameters,
    as a checkpoint keeps them) normalised its images: what a model trained there expects. ImageNet's for
    an ImageFolder or where the settings are unknown."""
    dataset = hparams.get("dataset")
    if dataset == "synthetic":
        ds = SyntheticRelations("val", img_size=hparams.get("img_size", 64), train_size=1, val_size=1,
                                num_classes=hparams.get("num_classes") or DEFAULT_NUM_CLASSES,
                                difficulty=hparams.get("difficulty", 0.5))
        return (ds.mean,) * 3, (ds.std,) * 3
    return CIFAR_STATS[dataset] if dataset in CIFAR else IMAGENET_STATS


def check_rand_augment(text: str) -> None:
    """A timm augmentation string, parsed now: timm's parser asserts, so a typo was an AssertionError
    traceback once the run had started."""
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=text)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(f"rand_augment={text!r} is not a timm augmentation string ({str(e) or type(e).__name__}); "
                        f"allowed: e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix), original or v0 "
                        f"(AutoAugment), or unset") from None


class ImageDataModule(L.LightningDataModule):
    """Train/val/test loaders for `dataset`; predict uses the test split.

    `num_classes` is known before setup() (LightningCLI links it to the model at instantiation):
    chosen for synthetic (default 4), fixed for CIFAR, the number of class folders of root/train for
    imagefolder. `rand_augment` (a timm string such as "rand-m9-mstd0.5-inc1") and
    `random_erasing` apply to real data only.
    """

    def __init__(self, dataset: DatasetName = "synthetic", root: Optional[str] = None, img_size: PositiveInt = 64,
                 batch_size: PositiveInt = 64, num_workers: NonNegativeInt = 0, num_classes: Optional[int] = None,
                 train_size: int = 4096, val_size: int = 1024, difficulty: float = 0.5, seed: Seed = 0,
                 download: bool = False, rand_augment: Optional[str] = None, random_erasing: Unit = 0.0,
                 skip_corrupt: bool = False, pin_memory: bool = False):
        hparams = plain({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        if dataset == "synthetic":
            if rand_augment or random_erasing:
                raise UserError(f"rand_augment={rand_augment!r} / random_erasing={random_erasing!r} apply to "
                                "real data only (they would change the synthetic labels): leave them unset")
            check_settings(DEFAULT_NUM_CLASSES if num_classes is None else num_classes, difficulty,
                           train_size, val_size)
        elif root is None or not str(root).strip():  # "": the working folder, named nowhere in the errors
            raise UserError(f"dataset {dataset!r} needs --data.root (the folder holding its files), got {root!r}")
        if rand_augment and dataset != "synthetic":
            check_rand_augment(rand_augment)
        self.save_hyperparameters(hparams)
        self.dataset, self.root, self.img_size, self.batch_size = dataset, root, img_size, batch_size
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self._num_classes_arg = num_classes
        self._num_classes: Optional[int] = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None
        if num_classes is not None and dataset != "synthetic":
            _ = self.num_classes  # checks the given value against the data now, not at first use

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            if self.dataset == "synthetic":
                n = DEFAULT_NUM_CLASSES if self._num_classes_arg is None else self._num_classes_arg
            elif self.dataset in CIFAR:
                n = CIFAR[self.dataset][2]
            else:
                n = len(class_folders(self.root, "train"))
            given = self._num_classes_arg
            if given is not None and given != n:
                raise UserError(f"num_classes={given} disagrees with {self.dataset} under {self.root}, "
                                f"which has {n} classes: leave num_classes unset")
            self._num_classes = n
        return self._num_classes

    @property
    def skipped(self) -> int:
        """Unreadable images skipped so far (imagefolder with skip_corrupt=True; else 0)."""
        return sum(getattr(ds, "skipped", 0) for ds in (self.train_set, self.val_set) if ds is not None)

    def _transforms(self, mean, std, crop_pct: Optional[float]):
        from timm.data import create_transform

        hp = self.hparams
        train = create_transform(self.img_size, is_training=True, auto_augment=hp.rand_augment,
                                 re_prob=hp.random_erasing, re_mode="pixel", interpolation="bicubic",
                                 mean=mean, std=std)
        val = create_transform(self.img_size, is_training=False, interpolation="bicubic",
                               crop_pct=crop_pct, mean=mean, std=std)
        return train, val

    def prepare_data(self) -> None:
        # Lightning calls this on one process only: the place for the (opt-in) download.
        if self.dataset in CIFAR and self.hparams.download:
            cifar(self.dataset, self.root, train=True, download=True)
            cifar(self.dataset, self.root, train=False, download=True)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        n = self.num_classes
        if self.dataset == "synthetic":
            kw = dict(img_size=self.img_size, num_classes=n, difficulty=hp.difficulty,
                      train_size=hp.train_size, val_size=hp.val_size, seed=self.seed)
            self.train_set, self.val_set = SyntheticRelations("train", **kw), SyntheticRelations("val", **kw)
            self.test_set = SyntheticRelations("test", **kw)  # val_size images of its own: held out
        elif self.dataset in CIFAR:
            # crop_pct 1: a 32 px image has no border to spare for the usual centre crop
            train_tf, val_tf = self._transforms(*CIFAR_STATS[self.dataset], crop_pct=1.0)
            self.train_set = cifar(self.dataset, self.root, True, train_tf, hp.download)
            self.val_set = self.test_set = cifar(self.dataset, self.root, False, val_tf, hp.download)
        else:
            train_tf, val_tf = self._transforms(*IMAGENET_STATS, crop_pct=None)
            self.train_set = ImageFolderDataset(self.root, "train", train_tf, hp.skip_corrupt)
            self.val_set = ImageFolderDataset(self.root, "val", val_tf, hp.skip_corrupt,
                                              classes=self.train_set.classes)
            self.test_set = self.val_set
            if os.path.isdir(os.path.join(self.root, "test")):  # a held-out split, when there is one
                self.test_set = ImageFolderDataset(self.root, "test", val_tf, hp.skip_corrupt,
                                                   classes=self.train_set.classes)

    @property
    def normalisation(self):
        """(mean, std) per channel of the normalised images: what a picture of them undoes for display."""
        return normalisation_of(self.hparams)

    def _loader(self, split: str) -> DataLoader:
        self.setup()  # no-op once done; lets the loaders be used without a Trainer
        ds = dict(train=self.train_set, val=self.val_set, test=self.test_set)[split]
        train = split == "train"
        sampler = None
        distributed = self.trainer is not None and self.trainer.world_size > 1
        world = self.trainer.world_size if distributed else 1
        if train and len(ds) // world < self.batch_size:  # drop_last: not one batch would be left
            per = f" per process ({len(ds)} over {world})" if world > 1 else ""
            raise UserError(f"batch_size={self.batch_size} is larger than the {len(ds) // world} training "
                            f"images{per}: no full batch; use batch_size <= {len(ds) // world}")
        rank = self.trainer.global_rank if distributed else 0
        if train:
            # the order of epoch e is a function of (seed, e) alone: a resumed run sees the same batches.
            # Its epoch is set here too: Lightning starts the loader, whose workers draw the first indices
            # at once, before its own set_epoch (so a resumed run replayed epoch 0's order)
            sampler = EpochShuffleSampler(len(ds), self.seed, rank, world)
            if self.trainer is not None:  # the value Lightning's set_epoch will give
                sampler.set_epoch(self.trainer.fit_loop.epoch_progress.current.processed)
            # the synthetic task's images are already functions of (seed, split, index) and not augmented
            ds = EpochSeededDataset(ds, None if self.dataset == "synthetic" else self.seed)
        elif distributed and len(ds) >= world and self._whole_split(split):
            sampler = EvalShardSampler(len(ds), rank, world)
        # a generator of its own: without one, every new iterator draws its base seed from the global
        # RNG, whose stream (drop path, Mixup) would then depend on when the loader was started
        gen = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=train, generator=gen,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def _whole_split(self, split: str) -> bool:
        """Evaluating all of it: shards of unequal size are then fine. A fraction (limit_val_batches=0.5)
        is taken per process, so unequal shards could leave one process none: Lightning's padded sampler.
        (Fewer images than processes, too.)"""
        limit = getattr(self.trainer, {"val": "limit_val_batches"}.get(split, "limit_test_batches"), 1.0)
        return isinstance(limit, float) and limit == 1.0

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """synthetic: its own held-out split; imagefolder: root/test when it exists; else (and for CIFAR,
        whose test set is the validation set here) the validation split."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
