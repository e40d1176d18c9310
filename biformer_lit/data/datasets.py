"""Real datasets: CIFAR-10/100 (torchvision) and an ImageNet-layout folder, with errors that say
what is wrong and where the files should go."""
import os
import warnings
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from ..errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

# name -> (torchvision class name, folder torchvision expects under root, number of classes)
CIFAR = {"cifar10": ("CIFAR10", "cifar-10-batches-py", 10), "cifar100": ("CIFAR100", "cifar-100-python", 100)}
CIFAR_STATS = {  # per-channel mean / std of the training sets
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def cifar(name: str, root: str, train: bool, transform: Optional[Callable] = None,
          download: bool = False) -> Dataset:
    """torchvision CIFAR-10/100 from root/<cifar-...>/; downloads only when asked."""
    import torchvision

    cls_name, folder, _ = CIFAR[name]
    label = name.upper().replace("CIFAR", "CIFAR-")
    missing = UserError(f"{label} not found under {root}: put {folder}/ there "
                        f"or pass --data.download=true")
    if not download and not os.path.isdir(os.path.join(root, folder)):
        raise missing
    try:
        return getattr(torchvision.datasets, cls_name)(root, train=train, transform=transform, download=download)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted" (failed checksum)
        raise UserError(f"{label} under {root} is incomplete or corrupted ({err}); remove {folder}/ "
                        f"and put a fresh copy there or pass --data.download=true") from err
    except OSError as err:  # urllib's URLError is an OSError: no network, proxy, disk full
        raise UserError(f"downloading {label} to {root} failed ({err}); put {folder}/ there by hand") from err


def class_folders(root: str, split: str) -> List[str]:
    """Sorted class folder names of root/split; cheap (one directory listing), so num_classes is
    known before any image is scanned."""
    path = os.path.join(root, split)
    if not os.path.isdir(root):
        problem = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise UserError(f"image folder root {root} {problem}: expected {root}/train/<class>/* "
                        f"and {root}/val/<class>/*")
    if not os.path.isdir(path):
        raise UserError(f"split folder {path} does not exist: expected {path}/<class>/*")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"no class folders in {path}: expected {path}/<class>/*")
    if len(classes) == 1:
        raise UserError(f"{path} has one class folder ({classes[0]!r}); classification needs at least 2")
    return classes


def image_files(folder: str) -> List[str]:
    """Image files under folder, following folder symlinks but each real folder once (a symlink loop
    would otherwise list a class's images dozens of times)."""
    seen, out = set(), []
    for d, subdirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = [s for s in subdirs if not s.startswith(".")]
        out += [os.path.join(d, f) for f in files if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16/32-bit greyscale scaled to 8 bits (PIL's convert clips them: 16-bit scans go white;
    float images in [0, 1] would go black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        peak = float(a.max()) if a.size else 0.0
        if img.mode == "F" and peak <= 1.0:  # float images in [0, 1]
            top = 1.0
        else:
            top = 255.0 if peak <= 255 and not img.mode.startswith("I;16") else 65535.0 if peak <= 65535 else peak
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """root/split/<class>/**/<image>, classes sorted by name (the torchvision ImageFolder order).

    Unreadable images raise UserError naming the file; with skip_corrupt=True they are replaced by
    the next readable image with a warning, and counted in `skipped`. The count lives in a shared
    memory tensor with one slot per DataLoader worker, so increments made inside worker processes
    are visible to the main process (workers warn in their own stderr). It counts encounters: a bad
    file read in every epoch is counted in every epoch; call reset_skipped() to start over.
    """

    _SLOTS = 257  # slot 0: main process; worker w uses 1 + w % 256

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None,
                 skip_corrupt: bool = False, classes: Optional[List[str]] = None):
        found = class_folders(root, split)
        if classes is not None and found != list(classes):
            extra, lacking = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
            raise UserError(f"class folders of {os.path.join(root, split)} differ from train: "
                            f"extra {extra[:5]}, missing {lacking[:5]}")
        self.root, self.split, self.classes = root, split, found
        self.transform, self.skip_corrupt = transform, skip_corrupt
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(found):
            folder = os.path.join(root, split, name)
            files = sorted(image_files(folder))
            if not files:
                raise UserError(f"class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)})")
            self.samples += [(f, label) for f in files]
        self._skipped = torch.zeros(self._SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def skipped(self) -> int:
        """Unreadable images met so far (all workers together)."""
        return int(self._skipped.sum())

    def reset_skipped(self) -> None:
        self._skipped.zero_()

    def _load(self, path: str) -> Image.Image:
        with open(path, "rb") as f:
            return to_rgb(Image.open(f))  # converting forces the decode, so errors surface here

    def __getitem__(self, index: int):
        for k in range(len(self.samples)):
            path, label = self.samples[(index + k) % len(self.samples)]
            try:
                img = self._load(path)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                if not self.skip_corrupt:
                    raise UserError(f"cannot read image {path}: {err} "
                                    f"(pass --data.skip_corrupt=true to skip such files)") from err
                info = get_worker_info()
                self._skipped[0 if info is None else 1 + info.id % (self._SLOTS - 1)] += 1
                warnings.warn(f"skipping unreadable image {path}: {err}")
                continue
            return (self.transform(img) if self.transform else img), label
        raise UserError(f"no readable image in {os.path.join(self.root, self.split)}")
