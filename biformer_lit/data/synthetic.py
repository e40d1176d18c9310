"""A synthetic task whose label is a relation between two far-apart objects.

Each image is a 4x4 grid of cells. Two *target* objects, marked by a white frame, sit at least two
cells apart (so an attention region that sees one cannot see the other). The label is a code of
relations between the targets:

    colour distance  0-3: in how many RGB channels their colours differ. The palette is the six
                     saturated corners of the RGB cube (R, Y, G, C, B, M), so 0 = same colour,
                     1 = neighbours on the hue wheel, 2 = two steps apart, 3 = complementary.
    size             same size? (large / small)        shape   same shape? (4 shapes)

code = colour distance + 4 * same size + 8 * same shape, using only the colour distance for
num_classes <= 4, colour and size for <= 8, all three for <= 16. The label is min(code, K - 1):
K = 2 is "same colour or not", K = 4 the colour distance, and the last class absorbs spare codes.
Item i is a pure function of (seed, split, i): everything comes from a torch.Generator seeded with
a hash of the three; nothing is cached or written.

`difficulty` (0..1): up to 0.5 the images are clean (little noise; attributes outside the label
fixed). Above 0.5 come unframed look-alike distractors, varying nuisance attributes, coloured
specks and more noise. With distractors, each attribute's multiset over all objects is drawn
before the targets are picked from it, so colour/size/shape histograms carry no label information
and the model must bind attributes to the frames.
"""
from functools import lru_cache
from typing import Callable, Dict, List, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import UserError

GRID = 4  # cells per side
# Saturated RGB-cube corners in hue-wheel order; the 3-bit code (R, G, B > 0.5) gives the distance.
PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.9, 0.9, 0.1], [0.1, 0.9, 0.1],
                        [0.1, 0.9, 0.9], [0.1, 0.1, 0.9], [0.9, 0.1, 0.9]])
RGB_CODES = [4, 6, 2, 3, 1, 5]
SHAPES = ("square", "disc", "triangle", "cross")
BACKGROUND = 0.3
SPLITS = {"train": 1, "val": 2, "test": 3}
MIN_IMG_SIZE = 64  # 16 px cells: 10 px shapes inside a 14 px frame
MIN_CLASSES, MAX_CLASSES = 2, 16
DEFAULT_NUM_CLASSES = 4  # the colour distance: learnt in a few minutes on 2 CPU cores
_STATS: Dict[tuple, Tuple[float, float]] = {}  # (img_size, num_classes, difficulty) -> (mean, std)


def colour_distance(a: int, b: int) -> int:
    return bin(RGB_CODES[a] ^ RGB_CODES[b]).count("1")


def _same(a: int, b: int) -> bool:
    return a == b


def _mix(x: int) -> int:
    """splitmix64 finaliser: nearby (seed, split, i) give unrelated generator seeds."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def item_seed(seed: int, split: str, index: int) -> int:
    return _mix(_mix(_mix(seed) ^ SPLITS[split]) ^ index) >> 1  # 63 bits: what manual_seed accepts


# Target cell pairs at least 2 cells apart along some axis (>= 2 cells minus the jitter in pixels).
FAR_PAIRS = [(a, b) for a in range(GRID * GRID) for b in range(GRID * GRID)
             if max(abs(a // GRID - b // GRID), abs(a % GRID - b % GRID)) >= 2]


@lru_cache(maxsize=8)
def _templates(img_size: int):
    """Masks (box, box) indexed 2 * shape + size, the frame mask, and the cell/box sizes."""
    cell = img_size // GRID
    box = cell - 2  # frame side; leaves 0..2 px of jitter inside the cell
    large = box - 4  # 1 px gap between frame and shape
    small = round(0.6 * large)
    small -= (large - small) % 2  # same parity as large: both centre exactly in the box
    yy, xx = torch.meshgrid(torch.arange(box) + 0.5, torch.arange(box) + 0.5, indexing="ij")
    c = box / 2
    masks = []
    for shape in SHAPES:
        for s in (small, large):
            h, t = s / 2, max(1.0, s / 6)  # half side, half thickness of the cross arms
            inside = ((yy - c).abs() <= h) & ((xx - c).abs() <= h)
            masks.append({"square": inside,
                          "disc": (yy - c) ** 2 + (xx - c) ** 2 <= h * h,
                          "triangle": inside & ((xx - c).abs() <= (yy - c + h) / 2),
                          "cross": inside & (((xx - c).abs() <= t) | ((yy - c).abs() <= t))}[shape])
    frame = torch.ones(box, box, dtype=torch.bool)
    frame[1:-1, 1:-1] = False
    return cell, box, torch.stack(masks), frame


class _Draws:
    """Uniform numbers drawn from the generator in batches, handed out one at a time (per-call
    overhead of torch.randint would dominate the cost of an image)."""

    def __init__(self, g: torch.Generator, n: int = 128):
        self.g, self.n, self.i = g, n, 0
        self.u = torch.rand(n, generator=g, dtype=torch.float64).tolist()

    def next(self) -> float:
        if self.i == len(self.u):  # rejection sampling ran long: draw more, still deterministic
            self.u += torch.rand(self.n, generator=self.g, dtype=torch.float64).tolist()
        self.i += 1
        return self.u[self.i - 1]

    def int(self, n: int) -> int:
        return min(int(self.next() * n), n - 1)


def _attribute(d: _Draws, levels: int, n: int, relation: Callable[[int, int], object], wanted,
               all_values: tuple) -> List[int]:
    """Values of one attribute for n objects, the first two (the targets) with relation == wanted;
    wanted=None: unconstrained. With distractors (n > 2) the multiset is drawn first, conditioned
    only on containing a pair for every value in all_values, so it does not depend on `wanted`;
    then the targets are a random pair of it with the wanted relation."""
    if n == 2:
        first = d.int(levels)
        options = [v for v in range(levels) if wanted is None or relation(first, v) == wanted]
        return [first, options[d.int(len(options))]]
    for _ in range(1000):  # acceptance is >= 30% for every setting used here (n >= 4)
        vals = [d.int(levels) for _ in range(n)]
        found = {relation(vals[i], vals[j]) for i in range(n) for j in range(i + 1, n)}
        if found.issuperset(all_values):
            break
    else:
        raise AssertionError("unreachable: multiset rejection sampling did not converge")
    pairs = [(i, j) for i in range(n) for j in range(n)
             if i != j and (wanted is None or relation(vals[i], vals[j]) == wanted)]
    i, j = pairs[d.int(len(pairs))]
    rest = [vals[k] for k in range(n) if k not in (i, j)]
    return [vals[i], vals[j]] + rest


def check_settings(num_classes: int, difficulty: float, train_size: int, val_size: int) -> None:
    """The task's settings (the datamodule checks them at construction, before any dataset exists)."""
    if not isinstance(num_classes, int) or not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise UserError(f"synthetic num_classes={num_classes!r} is not supported: use an integer in "
                        f"{MIN_CLASSES}..{MAX_CLASSES} (colour distance x same size x same shape)")
    if not 0.0 <= float(difficulty) <= 1.0:
        raise UserError(f"synthetic difficulty={difficulty!r} is outside [0, 1]")
    for name, n in (("train_size", train_size), ("val_size", val_size)):
        if not isinstance(n, int) or n < 1:
            raise UserError(f"synthetic {name}={n!r} must be a positive integer")


class SyntheticRelations(Dataset):
    """Relations between two distant framed objects; see the module docstring for the rule.
    Images are (3, img_size, img_size) float tensors, roughly zero mean and unit std."""

    def __init__(self, split: str = "train", img_size: int = 64, num_classes: int = DEFAULT_NUM_CLASSES,
                 difficulty: float = 0.5, train_size: int = 4096, val_size: int = 1024, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"synthetic split={split!r} is not one of {sorted(SPLITS)}")
        if not isinstance(img_size, int) or img_size < MIN_IMG_SIZE:
            raise UserError(f"synthetic img_size={img_size!r} is too small: use an integer >= {MIN_IMG_SIZE} "
                            "(smaller cells cannot draw distinguishable shapes)")
        check_settings(num_classes, difficulty, train_size, val_size)
        self.split, self.img_size, self.num_classes = split, img_size, num_classes
        self.difficulty, self.seed = float(difficulty), seed
        self.size = train_size if split == "train" else val_size
        self.num_codes = 4 if num_classes <= 4 else 8 if num_classes <= 8 else 16
        # Clean up to 0.5: with pixel noise, clutter or varying nuisance attributes the small CPU
        # models memorised a 4096-image split before finding the relation (measured).
        d = self.difficulty
        self.distractors = 0 if d <= 0.5 else 2 + round(4 * (d - 0.5))  # >= 2: see _attribute
        self.vary_nuisance = d > 0.5  # else attributes outside the label are fixed: large squares
        self.specks = int(6 * d ** 3)  # tiny coloured dots: 0 up to 0.55, 6 at 1
        self.noise = 0.02 + 0.18 * d ** 3
        self.jitter = 0.2 * d ** 3  # per-object brightness
        self.mean, self.std = self._stats()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        label = index % self.num_classes  # exactly balanced; loaders shuffle
        return self.render(label, item_seed(self.seed, self.split, index)), label

    def relations(self, label: int, d: _Draws) -> Dict[str, object]:
        """The relations of the targets for a label (None: outside the label, left free)."""
        code = label if label < self.num_classes - 1 else label + d.int(self.num_codes - label)
        return {"colour": code & 3,
                "size": bool(code & 4) if self.num_codes > 4 else None,
                "shape": bool(code & 8) if self.num_codes > 8 else None}

    def _stats(self) -> Tuple[float, float]:
        """Pixel mean/std of unnormalised images, from a few fixed renders; cached per setting."""
        key = (self.img_size, self.num_classes, self.difficulty)
        if key not in _STATS:
            x = torch.stack([self.render(i % self.num_classes, _mix(i), normalise=False) for i in range(32)])
            _STATS[key] = (x.mean().item(), x.std().item())
        return _STATS[key]

    def render(self, label: int, gen_seed: int, normalise: bool = True) -> torch.Tensor:
        g = torch.Generator().manual_seed(gen_seed)
        d = _Draws(g)
        rel = self.relations(label, d)
        n = 2 + self.distractors
        attrs = {}
        for name, levels, relation, values, fixed in (
                ("colour", len(PALETTE), colour_distance, (0, 1, 2, 3), None),
                ("size", 2, _same, (False, True), 1),  # fixed: large
                ("shape", len(SHAPES), _same, (False, True), 0)):  # fixed: square
            if rel[name] is None and not self.vary_nuisance and fixed is not None:
                attrs[name] = [fixed] * n
            else:
                attrs[name] = _attribute(d, levels, n, relation, rel[name], values)
        a, b = FAR_PAIRS[d.int(len(FAR_PAIRS))]
        free = [c for c in torch.randperm(GRID * GRID, generator=g).tolist() if c not in (a, b)]
        cells = [a, b] + free[: self.distractors]

        cell, box, masks, frame = _templates(self.img_size)
        origin = (self.img_size - GRID * cell) // 2
        img = torch.full((3, self.img_size, self.img_size), BACKGROUND)
        for k in range(n):
            y = origin + cells[k] // GRID * cell + d.int(cell - box + 1)
            x = origin + cells[k] % GRID * cell + d.int(cell - box + 1)
            patch = img[:, y:y + box, x:x + box]  # a view: writes land in img
            colour = PALETTE[attrs["colour"][k]] * (1 + self.jitter * (2 * d.next() - 1))
            mask = masks[2 * attrs["shape"][k] + attrs["size"][k]]
            patch.copy_(torch.where(mask, colour[:, None, None], patch))
            if k < 2:  # targets carry the frame
                patch.masked_fill_(frame, 1.0)
        dot = max(2, self.img_size // 32)
        for c in free[self.distractors: self.distractors + self.specks]:
            y = origin + c // GRID * cell + d.int(cell - dot + 1)
            x = origin + c % GRID * cell + d.int(cell - dot + 1)
            img[:, y:y + dot, x:x + dot] = PALETTE[d.int(len(PALETTE))][:, None, None]
        img.add_(torch.randn(img.shape, generator=g), alpha=self.noise)
        if normalise:
            img.sub_(self.mean).div_(self.std)
        return img


def describe(code: int) -> str:
    """A code in words, e.g. describe(5) == 'colour distance 1, same size, different shape'."""
    return (f"colour distance {code & 3}, {'same' if code & 4 else 'different'} size, "
            f"{'same' if code & 8 else 'different'} shape")

