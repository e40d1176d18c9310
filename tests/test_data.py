"""biformer_lit.data: the synthetic relation task, ImageFolder/CIFAR errors, the DataModule."""
import os
import tempfile
import time
from collections import Counter

import pytest
import torch
from PIL import Image

from biformer_lit.data import ImageDataModule, ImageFolderDataset, SyntheticRelations
from biformer_lit.errors import UserError
from biformer_lit.data import synthetic


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny tensor ops: intra-op threads only add spin-wait overhead, badly so when
    # other jobs share the two cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- synthetic -------------------------------------------------------------------------------

@pytest.mark.parametrize("difficulty", [0.5, 1.0])  # 1.0: distractors, rejection sampling
def test_same_seed_same_items_other_seed_or_split_differs(difficulty):
    a, b = (SyntheticRelations("train", seed=3, difficulty=difficulty) for _ in range(2))
    for i in (0, 1, 77):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    other_seed = SyntheticRelations("train", seed=4, difficulty=difficulty)
    other_split = SyntheticRelations("val", seed=3, difficulty=difficulty)
    assert not torch.equal(a[5][0], other_seed[5][0])
    assert not torch.equal(a[5][0], other_split[5][0])
    assert not torch.equal(a[5][0], a[5 + 8][0])  # same label, different item


def test_item_is_independent_of_access_order():
    ds = SyntheticRelations("val", seed=1)
    late = ds[40][0]
    for i in range(5):
        ds[i]
    assert torch.equal(ds[40][0], late)


def test_shape_dtype_normalisation_and_speed():
    ds = SyntheticRelations("train", img_size=64)
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and isinstance(y, int)
    batch = torch.stack([ds[i][0] for i in range(64)])
    assert abs(batch.mean().item()) < 0.2 and 0.8 < batch.std().item() < 1.2
    start = time.perf_counter()
    for i in range(200):
        ds[i]
    assert time.perf_counter() - start < 2.0  # ~0.15 ms each on one core; generous for shared CPUs
    assert SyntheticRelations("val", img_size=80)[3][0].shape == (3, 80, 80)
    assert SyntheticRelations("val", img_size=100)[3][0].shape == (3, 100, 100)


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16])
def test_labels_balanced(k):
    ds = SyntheticRelations("val", num_classes=k, val_size=k * 20)
    counts = Counter(ds[i][1] for i in range(len(ds)))
    assert sorted(counts) == list(range(k)) and set(counts.values()) == {20}


def test_no_files_written(tmp_path, monkeypatch):
    work, tmp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir(), tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dm = ImageDataModule(train_size=128, val_size=64, batch_size=32, difficulty=0.3)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for _ in loader:
            pass
    assert not any(work.iterdir()) and not any(tmp.iterdir())


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_classes=1), ["num_classes=1", "2..16"]),
    (dict(num_classes=17), ["num_classes=17", "2..16"]),
    (dict(difficulty=1.5), ["difficulty=1.5", "[0, 1]"]),
    (dict(img_size=48), ["img_size=48", ">= 64"]),
    (dict(split="test2"), ["split='test2'"]),
    (dict(train_size=0), ["train_size=0"]),
])
def test_synthetic_rejects_bad_values(kwargs, words):
    with pytest.raises(UserError) as err:
        SyntheticRelations(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert isinstance(err.value, ValueError)


def _colour_histogram(img: torch.Tensor) -> torch.Tensor:
    """Global colour statistics of an unnormalised image: pixel counts of each palette colour (raw
    and sorted), which colours cover an object-sized area, and how many do. The palette colours are
    the 6 non-grey corners of the RGB cube, so thresholding at 0.5 names them; 2x2 pooling first
    damps pixel noise and most of the tiny specks."""
    img = torch.nn.functional.avg_pool2d(img[None], 2)[0]
    code = ((img > 0.5).long() * torch.tensor([4, 2, 1])[:, None, None]).sum(0)
    counts = torch.bincount(code.flatten(), minlength=8)[1:7].float()  # 0: background, 7: frames
    present = (counts >= 4).float()
    return torch.cat([counts / 10, counts.sort(descending=True).values / 10, present, present.sum()[None]])


def _probe_accuracy(ds, features=slice(None), n_train=600, n_test=400) -> float:
    """Logistic regression on global colour statistics: train on items [0, n_train), test after."""
    feats = torch.stack([_colour_histogram(ds[i][0] * ds.std + ds.mean)[features]
                         for i in range(n_train + n_test)])
    labels = torch.tensor([i % ds.num_classes for i in range(n_train + n_test)])
    feats = (feats - feats[:n_train].mean(0)) / (feats[:n_train].std(0) + 1e-6)
    lin = torch.nn.Linear(feats.shape[1], ds.num_classes)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=100)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(feats[:n_train]), labels[:n_train])
        loss.backward()
        return loss

    opt.step(closure)
    return (lin(feats[n_train:]).argmax(1) == labels[n_train:]).float().mean().item()


def test_pooled_colour_counts_do_not_give_the_label():
    # Default difficulty, label = same colour or not: a model that pools local features and reads
    # them out linearly sees at most the colour counts, and those do not separate the classes.
    assert _probe_accuracy(SyntheticRelations("train", num_classes=2), features=slice(0, 6)) < 0.6


def test_global_colour_statistics_do_not_give_the_label_with_distractors(monkeypatch):
    # With look-alike distractors (difficulty > 0.5) every colour statistic of the image, even the
    # number of distinct object colours, is independent of the label: the colour multiset is drawn
    # before the targets are picked from it.
    ds = SyntheticRelations("train", num_classes=2, difficulty=0.6, train_size=1000)
    assert ds.distractors == 2
    assert _probe_accuracy(ds) < 0.6

    # Positive control: the same probe catches a generator whose distractor colours are drawn
    # independently of the targets' (the obvious, leaky design), so the check above can fail.
    real = synthetic._attribute

    def leaky(d, levels, n, relation, wanted, all_values):
        return real(d, levels, 2, relation, wanted, all_values) + [d.int(levels) for _ in range(n - 2)]

    monkeypatch.setattr(synthetic, "_attribute", leaky)
    assert _probe_accuracy(ds) > 0.65


def _decode_targets(ds, img):
    """(colour, shape, size) of the two framed objects, read back from the pixels of a clean image."""
    img = img * ds.std + ds.mean
    cell, box, masks, _ = synthetic._templates(ds.img_size)
    found = []
    for r in range(synthetic.GRID):
        for c in range(synthetic.GRID):
            patch = img[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]
            if (patch > 0.8).all(0).sum() < 30:  # no white frame: not a target
                continue
            coloured = (patch.max(0).values > 0.5) & (patch.min(0).values < 0.5)
            colour = (patch[:, coloured].mean(1) - synthetic.PALETTE).norm(dim=1).argmin().item()
            matches = [k for k in range(len(masks)) if _crop(masks[k]).shape == _crop(coloured).shape
                       and torch.equal(_crop(masks[k]), _crop(coloured))]
            assert len(matches) == 1
            found.append((colour, matches[0] // 2, matches[0] % 2))
    assert len(found) == 2
    return found


def _crop(mask):
    ys, xs = mask.nonzero(as_tuple=True)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_label_is_the_documented_relation_of_the_framed_objects(k):
    ds = SyntheticRelations("val", num_classes=k, difficulty=0.0)
    for i in range(48):
        img, label = ds[i]
        (ca, sha, sza), (cb, shb, szb) = _decode_targets(ds, img)
        code = synthetic.colour_distance(ca, cb) + 4 * (sza == szb) * (k > 4) + 8 * (sha == shb) * (k > 8)
        assert min(code, k - 1) == label, (i, synthetic.describe(code))
        if k <= 4:  # attributes outside the label are fixed at low difficulty: large squares
            assert (sha, sza, shb, szb) == (0, 1, 0, 1)


def test_targets_are_far_apart():
    for a, b in synthetic.FAR_PAIRS:  # at least 2 cells apart along one axis: >= 2 cells - jitter
        assert max(abs(a // 4 - b // 4), abs(a % 4 - b % 4)) >= 2


# ---- DataModule ------------------------------------------------------------------------------

def test_num_classes_before_setup(tmp_path):
    assert ImageDataModule().num_classes == synthetic.DEFAULT_NUM_CLASSES
    assert ImageDataModule(num_classes=4).num_classes == 4
    assert ImageDataModule("cifar100", root=str(tmp_path)).num_classes == 100  # no files needed
    root = _image_folder(tmp_path, classes=("a", "b", "c"))
    dm = ImageDataModule("imagefolder", root=str(root))
    assert dm.num_classes == 3 and dm.train_set is None and dm.img_size == 64


@pytest.mark.parametrize("kwargs, words", [
    (dict(dataset="cifar10", root="x", num_classes=100), ["num_classes=100", "10 classes"]),
    (dict(dataset="cifar10"), ["--data.root"]),
    (dict(dataset="imagefolder", root=""), ["--data.root", "got ''"]),  # said "image folder root  does not exist"
    (dict(num_classes=40), ["num_classes=40"]),
    (dict(difficulty=-0.1), ["difficulty=-0.1"]),
    # timm's parser asserts: each was an AssertionError / ValueError traceback once the run had started
    (dict(dataset="cifar10", root="x", rand_augment="bogus"), ["rand_augment='bogus'", "Unknown AA policy bogus",
                                                               "rand-m9-mstd0.5-inc1"]),
    (dict(dataset="cifar10", root="x", rand_augment="randx"), ["rand_augment='randx'", "(AssertionError)",
                                                               "allowed: e.g."]),
    (dict(rand_augment="rand-m9-mstd0.5-inc1"), ["rand_augment='rand-m9-mstd0.5-inc1'", "real data"]),
])
def test_datamodule_rejects_bad_values(kwargs, words):
    """(Types and ranges the parser checks, e.g. data.batch_size, are in test_cli's bad input.)"""
    with pytest.raises(UserError) as err:
        ImageDataModule(**kwargs)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_synthetic_loaders():
    dm = ImageDataModule(train_size=100, val_size=40, batch_size=32, seed=5)
    train = list(dm.train_dataloader())
    assert len(train) == 3  # drop_last
    assert train[0][0].shape == (32, 3, 64, 64) and train[0][1].dtype == torch.int64
    again = next(iter(ImageDataModule(train_size=100, val_size=40, batch_size=32, seed=5).train_dataloader()))
    assert torch.equal(again[0], train[0][0])  # same seed -> same order
    other = next(iter(ImageDataModule(train_size=100, val_size=40, batch_size=32, seed=6).train_dataloader()))
    assert not torch.equal(other[1], train[0][1])
    val = [y for _, y in dm.val_dataloader()]
    # no shuffle, nothing dropped
    assert torch.cat(val).tolist() == [i % synthetic.DEFAULT_NUM_CLASSES for i in range(40)]
    assert len(dm.test_dataloader().dataset) == len(dm.predict_dataloader().dataset) == 40


# ---- ImageFolder / CIFAR ---------------------------------------------------------------------

def _image_folder(tmp_path, classes=("a", "b"), per_class=3, splits=("train", "val")):
    root = tmp_path / "imgs"
    for split in splits:
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                Image.new("RGB", (40 + 4 * k, 36), (40 * ci, 100, 20 * k)).save(root / split / c / f"{k}.png")
    return root


def test_imagefolder_loaders(tmp_path):
    root = _image_folder(tmp_path)
    (root / "train" / "a" / "notes.txt").write_text("not an image")  # ignored
    dm = ImageDataModule("imagefolder", root=str(root), img_size=32, batch_size=2,
                         rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert len(dm.train_set) == 6 and dm.train_set.classes == ["a", "b"]
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 32, 32) and yv.tolist() == [0, 0]


def test_imagefolder_missing_folders(tmp_path):
    with pytest.raises(UserError, match="nowhere does not exist"):
        ImageDataModule("imagefolder", root=str(tmp_path / "nowhere")).num_classes
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="afile is a file, not a folder"):  # it said "does not exist"
        ImageDataModule("imagefolder", root=str(tmp_path / "afile")).num_classes
    root = _image_folder(tmp_path, splits=("train",))
    dm = ImageDataModule("imagefolder", root=str(root))
    with pytest.raises(UserError) as err:
        dm.setup()
    assert str(root / "val") in str(err.value)


def test_imagefolder_empty_class_folder(tmp_path):
    root = _image_folder(tmp_path)
    (root / "train" / "zzz").mkdir()
    with pytest.raises(UserError) as err:
        ImageFolderDataset(str(root), "train")
    assert str(root / "train" / "zzz") in str(err.value)


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_imagefolder_corrupt_image(tmp_path):
    root = _image_folder(tmp_path)
    bad = root / "train" / "b" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolderDataset(str(root), "train")
    assert ds[0][1] == 0
    with pytest.raises(UserError) as err:
        ds[4]
    assert str(bad) in str(err.value) and "skip_corrupt" in str(err.value)

    ds = ImageFolderDataset(str(root), "train", skip_corrupt=True)
    with pytest.warns(UserWarning, match="1.png"):
        img, label = ds[4]
    assert isinstance(img, Image.Image) and label == 1 and ds.skipped == 1  # the next file instead
    ds[4], ds[3]
    assert ds.skipped == 2
    ds.reset_skipped()
    assert ds.skipped == 0


@pytest.mark.filterwarnings("ignore:skipping unreadable")
def test_skip_count_seen_across_workers(tmp_path):
    root = _image_folder(tmp_path, per_class=4)
    (root / "train" / "a" / "2.png").write_bytes(b"not a png")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=32, batch_size=4, num_workers=1,
                         skip_corrupt=True)
    assert sum(len(y) for _, y in dm.train_dataloader()) == 8
    assert dm.skipped == 1  # counted in the worker process, read here


def test_cifar_missing_files(tmp_path):
    dm = ImageDataModule("cifar100", root=str(tmp_path))
    with pytest.raises(UserError) as err:
        dm.setup()
    msg = str(err.value)
    assert f"CIFAR-100 not found under {tmp_path}" in msg and "cifar-100-python/" in msg
    assert "--data.download=true" in msg
    assert not any(tmp_path.iterdir())  # nothing downloaded


def test_cifar_corrupt_files(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(UserError, match="CIFAR-10 under .* is incomplete or corrupted"):
        ImageDataModule("cifar10", root=str(tmp_path)).setup()


@pytest.mark.parametrize("name", ["cifar100", "imagenet"])
def test_config_fragments_construct(name):
    import yaml

    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", f"{name}.yaml")
    with open(path) as f:
        dm = ImageDataModule(**yaml.safe_load(f)["data"])
    assert dm.img_size == 224 and dm.hparams.rand_augment == "rand-m9-mstd0.5-inc1"


def test_test_split_is_held_out_where_the_data_has_one(tmp_path):
    dm = ImageDataModule("synthetic", img_size=64, batch_size=8, train_size=32, val_size=16, seed=0)
    val, test = next(iter(dm.val_dataloader()))[0], next(iter(dm.test_dataloader()))[0]
    assert len(dm.test_set) == 16 and not torch.equal(val, test)  # its own images, not the validation ones
    root = _image_folder(tmp_path)
    assert ImageDataModule("imagefolder", root=str(root), img_size=32, batch_size=2).test_dataloader().dataset.split \
        == "val"  # no root/test: the validation split
    (root / "test" / "a").mkdir(parents=True)
    (root / "test" / "b").mkdir()
    for c in "ab":
        Image.new("RGB", (40, 40)).save(root / "test" / c / "0.png")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=32, batch_size=2)
    assert dm.test_dataloader().dataset.split == "test" and len(dm.test_set) == 2


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    """PIL's convert("RGB") clips 16-bit greyscale: a scan spanning 0..65535 came out 99.8% white."""
    import numpy as np
    from biformer_lit.data.datasets import to_rgb
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    with Image.open(tmp_path / "scan.png") as im:
        assert im.mode == "I;16"
        rgb = np.asarray(to_rgb(im))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 2 and rgb.min() == 0 and rgb.max() == 255


def test_float_images_in_unit_range_are_not_black():
    import numpy as np
    from biformer_lit.data.datasets import to_rgb
    rgb = np.asarray(to_rgb(Image.fromarray(np.full((8, 8), 0.8, dtype=np.float32), mode="F")))
    assert rgb.shape == (8, 8, 3) and (rgb == 204).all()


def test_a_symlink_loop_lists_each_image_once(tmp_path):
    root = _image_folder(tmp_path)
    (root / "train" / "a" / "sub").mkdir()
    (root / "train" / "a" / "sub" / "loop").symlink_to(root / "train" / "a", target_is_directory=True)
    ds = ImageFolderDataset(str(root), "train")
    assert len(ds) == 6  # 3 per class, not the loop's dozens


def test_one_class_and_a_failed_download_are_clean_errors(tmp_path, monkeypatch):
    root = _image_folder(tmp_path, classes=("only",))
    with pytest.raises(UserError, match=r"has one class folder \('only'\); classification needs at least 2"):
        ImageDataModule("imagefolder", root=str(root)).num_classes
    import urllib.error
    import torchvision
    from biformer_lit.data.datasets import cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match=r"downloading CIFAR-10 to .* failed .*Name or service not known"):
        cifar("cifar10", str(tmp_path), train=True, download=True)


def test_training_set_takes_plain_indices_too():
    """Lightning's overfit_batches swaps in a SequentialSampler (plain indices) over the training set."""
    from biformer_lit.data import ImageDataModule
    dm = ImageDataModule(img_size=64, batch_size=2, train_size=8, val_size=4)
    ds = dm.train_dataloader().dataset
    x, y = ds[3]
    assert torch.equal(x, dm.train_set[3][0]) and torch.equal(ds[(5, 3)][0], x)  # synthetic: not augmented


def test_ddp_evaluation_shards_only_whole_splits():
    """Every image once (unequal shards) when the whole split is evaluated; a fraction is taken per process,
    so there Lightning's padded sampler keeps the shards equal (one process would get no batch)."""
    from types import SimpleNamespace
    from biformer_lit.data import ImageDataModule
    from biformer_lit.data.sampler import EvalShardSampler
    dm = ImageDataModule(img_size=64, batch_size=8, train_size=16, val_size=17)
    for limit, sharded in ((1.0, True), (0.5, False), (1, False)):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=1, limit_val_batches=limit, limit_test_batches=1.0)
        assert isinstance(dm.val_dataloader().sampler, EvalShardSampler) == sharded, limit
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1, limit_val_batches=1.0, limit_test_batches=1.0)
    assert list(dm.val_dataloader().sampler) == list(range(1, 17, 2))
