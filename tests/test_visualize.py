"""Routing pictures: the drawn routing is the model's, the CLI writes PNGs, the callback logs to
TensorBoard, and none of it changes the model."""
from types import SimpleNamespace

import numpy as np
import pytest
import lightning as L
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import biformer_lit.models  # noqa: F401  (registers the models with timm)
from biformer_lit import visualize as V
from biformer_lit.cli import main
from biformer_lit.commands.visualize import load_image
from biformer_lit.attention import create_attention
from biformer_lit.callbacks import RoutingVisualizer


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("biformer_cpu_tiny", num_classes=4)


def all_mixers(model):
    return [m for _, _, m in V.attention_layers(model)]


# --------------------------------------------------------------------------- crafted routing

def crafted_bra():
    """6x6 map, 3x3 regions of 2x2 tokens, top-2. q = channel 0 only, k = v = x: region affinity is
    mean_i(x0) * mean_j(x0), so with x0 > 0 everywhere every query region routes to the regions of
    largest mean x0, in that order."""
    dim = 4
    attn = create_attention("bra", dim, 1, n_win=3, topk=2, lepe_kernel=0).eval()
    with torch.no_grad():
        w = torch.zeros(3 * dim, dim)
        w[0, 0] = 1.0                        # q = (x0, 0, 0, 0)
        w[dim:2 * dim] = torch.eye(dim)      # k = x
        w[2 * dim:] = torch.eye(dim)         # v = x
        attn.qkv.weight.copy_(w)
        attn.qkv.bias.zero_()
    torch.manual_seed(0)
    x = torch.randn(1, 6, 6, dim) * 0.1
    x[..., 0] = 1.0
    x[0, 4:6, 2:4, 0] = 5.0  # region 7 (grid row 2, col 1): best key
    x[0, 0:2, 4:6, 0] = 3.0  # region 2 (grid row 0, col 2): second
    return attn, x


def test_crafted_routing_is_captured_and_drawn_exactly():
    attn, x = crafted_bra()
    rec = V.record_layers(attn, x)[0]
    assert rec.kind == "bra" and rec.size == (6, 6) and rec.cell == (2, 2)
    assert rec.index.tolist() == [[[7, 2]] * 9]  # every query region: region 7, then region 2

    # overlay on a 24x24 image: each token is 4x4 pixels, each region 8x8
    expected = np.zeros((24, 24), bool)
    expected[16:24, 8:16] = True  # region 7
    expected[0:8, 16:24] = True   # region 2
    strength = V.routing_overlay(rec, [0, 4], (24, 24))
    assert strength.shape == (2, 24, 24)
    for s in strength:
        np.testing.assert_array_equal(s > 0, expected)
        assert s[16:24, 8:16].min() == 1.0 and s[0:8, 16:24].max() < 1.0  # rank 0 drawn stronger
    rgb = np.full((24, 24, 3), 0.5)
    tinted = np.abs(V.blend(rgb, strength) - rgb).sum(-1) > 1e-6
    np.testing.assert_array_equal(tinted, expected)  # the blended picture changes exactly there

    # token-level keys of a query token: the routed regions' tokens, from the reference pattern
    keys = V.allowed_keys(rec, (3, 3))
    np.testing.assert_array_equal(V.to_pixels(keys, (24, 24)), expected)

    image = torch.full((3, 24, 24), 0.5)
    arr = V.figure_to_array(V.routing_figure(image, rec, [0, 4], (3, 3), mean=None, std=None))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and arr.std() > 0


def test_grid_lines_follow_the_cells_attention_used():
    """Axial stripes of a set width are drawn at that width, not at the region edge."""
    x = torch.randn(1, 12, 12, 16)
    rec = V.record_layers(create_attention("axial", 16, 2, n_win=3, stripe_width=2), x)[0]
    assert V._grid_lines(rec, 0) == V._grid_lines(rec, 1) == [2, 4, 6, 8, 10]
    rec = V.record_layers(create_attention("axial", 16, 2, n_win=3), x)[0]
    assert V._grid_lines(rec, 0) == [4, 8]


@pytest.mark.parametrize("kind", ["bra", "window", "shifted_window", "axial", "dilated", "full"])
def test_attention_weights_reproduce_the_layer_output(kind):
    # weights @ values must give the layer's own mixing output at that token (7x8: padded regions too)
    torch.manual_seed(1)
    attn = create_attention(kind, 16, 4, n_win=3, topk=2, lepe_kernel=0).eval()
    x = torch.randn(2, 7, 8, 16)
    rec = V.record_layers(attn, x, keep_inputs=True)[0]
    wts = V.attention_weights(attn, rec, (5, 2), batch=1)
    assert wts.shape == (4, 7, 8)
    torch.testing.assert_close(wts.sum((1, 2)), torch.ones(4))
    assert not (wts > 0)[0].logical_and(~V.allowed_keys(rec, (5, 2), batch=1)).any()
    with torch.no_grad():  # no LePE: the layer's output is proj(attention), v from the shared qkv Linear
        out = attn(x)[1, 5, 2]
        v = attn.qkv(x)[1, ..., 32:].reshape(56, 4, 4)
        mine = attn.proj(torch.einsum("hn,nhd->hd", wts.reshape(4, -1), v).reshape(16))
    torch.testing.assert_close(mine, out)


# --------------------------------------------------------------------------- CLI

def write_image(path, size=(80, 60)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("wrap", [True, False], ids=["original_format", "bare_state_dict"])
def test_main_writes_readable_pngs(tmp_path, capsys, wrap):
    sd = tiny_model().state_dict()
    weights = tmp_path / "w.pth"
    torch.save({"model": sd} if wrap else sd, weights)
    write_image(tmp_path / "cat.png")
    extra = ["--heat"] if wrap else ["--stage", "2"]  # keep it short: one full run, one single stage
    rc = main(["visualize", "--model", "biformer_cpu_tiny", "--weights", str(weights), "--image", str(tmp_path / "cat.png"),
                 "--out", str(tmp_path / "out"), *extra])
    assert rc == 0
    names = {"cat_stage0_block0_bra.png", "cat_stage1_block0_bra.png", "cat_stage2_block1_bra.png",
             "cat_stage3_block0_full.png"} if wrap else {"cat_stage2_block1_bra.png"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == names
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / n) for n in sorted(names)]
    for n in names:
        with Image.open(tmp_path / "out" / n) as im:
            assert im.width > 300 and im.height > 200
            assert np.asarray(im.convert("RGB")).std() > 10


def test_main_missing_files_is_a_clean_error(tmp_path, capsys):
    rc = main(["visualize", "--model", "biformer_cpu_tiny", "--image", str(tmp_path / "nope.png"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "nope.png" in err and "Traceback" not in err
    assert main(["visualize", "--image", "x.png", "--out", str(tmp_path)]) == 2  # neither --ckpt_path nor --model


@pytest.mark.parametrize("extra,message", [
    (["--img_size", "0"], "--img_size 0; allowed: a positive size in pixels"),
    (["--img_size", "17"], "input of 17x17 px"),
    (["--query", "99"], "--query 99: no drawn layer has these regions (row-major ids; stage 0: 0..15"),
    (["--query_point", "1.5", "-2"], "--query_point 1.5 -2.0; allowed: fractions in [0, 1]"),
    (["--out", "{tmp}/afile"], "is a file; allowed: a folder"),
    (["--stage", "1", "7"], "--stage 7: no such stage; allowed: 0, 1, 2, 3"),
    (["--image", "{tmp}/a/x.png", "{tmp}/b/x.png"], "two --image files named 'x'"),
    (["--weights", "{tmp}/w.pth"], "does not fit model BiFormer (missing: head.bias"),
    (["--model", "resnet10t"], "the model has no attention layers to draw"),
])
def test_main_bad_values_are_clean_errors(tmp_path, capsys, extra, message):
    """Each was accepted silently (drawing something else) or ended in a traceback."""
    for name in ("cat.png", "a/x.png", "b/x.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_image(tmp_path / name)
    (tmp_path / "afile").write_text("")
    torch.save({"model": {"head.weight": torch.zeros(3, 7)}}, tmp_path / "w.pth")
    extra = [a.format(tmp=tmp_path) for a in extra]
    args = ["--model", "biformer_cpu_tiny", "--out", str(tmp_path / "o")]
    if "--image" not in extra:
        args += ["--image", str(tmp_path / "cat.png")]
    rc = main(["visualize", *args, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_main_unwritable_output_is_a_clean_error(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "out/a_stage0_block0_bra.png")

    from biformer_lit.commands import visualize as command
    monkeypatch.setattr(command, "run", denied)
    assert main(["visualize", "--model", "biformer_cpu_tiny", "--image", "a.png", "--out", "out"]) == 2
    assert capsys.readouterr().err == "error: cannot access out/a_stage0_block0_bra.png: Permission denied\n"


@pytest.mark.parametrize("source", ["--ckpt_path", "--weights"])
def test_main_unreadable_checkpoint_is_a_clean_error(tmp_path, capsys, source):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(range(256)) * 8)
    write_image(tmp_path / "cat.png")
    model = ["--model", "biformer_cpu_tiny"] if source == "--weights" else []
    rc = main(["visualize", *model, source, str(bad), "--image", str(tmp_path / "cat.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {bad}: not a readable PyTorch checkpoint (corrupt, truncated, or another " \
                              f"kind of file)\n"


def test_main_from_lightning_checkpoint(tmp_path):
    module = pytest.importorskip("biformer_lit.module")
    lm = module.ClassificationModule(model="biformer_cpu_tiny", num_classes=4)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    write_image(tmp_path / "dog.jpg")
    rc = main(["visualize", "--ckpt_path", str(ckpt), "--image", str(tmp_path / "dog.jpg"), "--out", str(tmp_path / "o"),
                 "--stage", "1"])
    assert rc == 0 and [p.name for p in (tmp_path / "o").iterdir()] == ["dog_stage1_block0_bra.png"]


def test_main_feeds_a_checkpoint_its_own_data_normalisation(tmp_path, monkeypatch):
    """A model of the synthetic task was fed ImageNet-normalised images, not its data's ((x - 0.32) / 0.14 at 8
    classes): the drawn routing was not the routing it computes on its data (measured: 3% of stage-1 query
    regions routed alike). The images it gets now are normalised as its training data were."""
    from biformer_lit.data import ImageDataModule
    from biformer_lit.data.datamodule import normalisation_of
    module = pytest.importorskip("biformer_lit.module")
    dm = ImageDataModule(img_size=64, num_classes=8, train_size=8, val_size=4)
    assert normalisation_of(dict(dm.hparams)) == dm.normalisation
    lm = module.ClassificationModule(model="biformer_cpu_tiny", num_classes=8)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": dict(lm.hparams),
                "datamodule_hyper_parameters": dict(dm.hparams), "pytorch-lightning_version": L.__version__}, ckpt)
    write_image(tmp_path / "scene.png")
    seen = []
    record = V.record_layers
    monkeypatch.setattr(V, "record_layers", lambda net, images, *a, **k: seen.append(images) or record(net, images, *a, **k))
    assert main(["visualize", "--ckpt_path", str(ckpt), "--image", str(tmp_path / "scene.png"), "--out", str(tmp_path / "o"),
                   "--stage", "1"]) == 0
    mean, std = dm.normalisation
    torch.testing.assert_close(seen[0], (load_image(tmp_path / "scene.png", 64)[None] - mean[0]) / std[0])


# --------------------------------------------------------------------------- callback

class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_model()

    def training_step(self, batch, _):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.model(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_logs_images_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 64, 64), torch.randint(0, 4, (4,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    logger = TensorBoardLogger(tmp_path, name="run")
    cb = RoutingVisualizer(num_images=2, stages=[0, 3])
    module = Tiny()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=logger, callbacks=[cb], accelerator="cpu", enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader, loader)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert tags == {f"routing/stage{s}_{k}/img{i}" for s, k in [(0, "bra"), (3, "full")] for i in (0, 1)}
    img = acc.Images("routing/stage0_bra/img0")[0]
    assert img.step == trainer.global_step and img.width > 300
    torch.testing.assert_close(cb.images, data.tensors[0][:2])  # the fixed images: first of the val batch
    assert all(m.capture is False and m.captured is None for m in all_mixers(module))
    assert cb.display_stats(trainer) == (V.IMAGENET_MEAN, V.IMAGENET_STD)  # no datamodule: ImageNet's


def test_callback_undoes_the_datamodule_normalisation():
    """The synthetic task is normalised with its own pixel statistics: pictures undo those (ImageNet's
    tinted its grey and clipped its white)."""
    from biformer_lit.data import ImageDataModule
    dm = ImageDataModule(img_size=64, batch_size=4, train_size=8, val_size=4)
    mean, std = RoutingVisualizer().display_stats(SimpleNamespace(datamodule=dm))
    dm.setup()
    assert (mean, std) == dm.normalisation and (mean, std) == ((dm.val_set.mean,) * 3, (dm.val_set.std,) * 3)
    assert RoutingVisualizer(mean=None, std=None).display_stats(SimpleNamespace(datamodule=dm)) == (None, None)
    x = dm.val_set[0][0]
    unnormalised = float(x.mean() * dm.val_set.std + dm.val_set.mean)  # to_display clips the odd pixel
    assert abs(V.to_display(x, mean, std).mean() - unnormalised) < 2e-3
    assert abs(V.to_display(x).mean() - unnormalised) > 0.05  # ImageNet's statistics: visibly off


# --------------------------------------------------------------------------- off = no change

def test_visualising_leaves_the_model_unchanged():
    model = tiny_model()
    model.train()
    model.stages[0].blocks[0].attn.train(False)  # a mixed train/eval state must survive too
    before_modes = [m.training for m in model.modules()]
    assert all(m.captured is None and m.capture is False for m in all_mixers(model))
    x = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        ref_out = model(x)
    model.train()
    model.stages[0].blocks[0].attn.train(False)

    V.attention_heat(model, x[0], 1, 0, (2, 3))
    records = V.record_layers(model, x, V.select_layers(model, all_blocks=True))
    assert [(r.stage, r.block) for r in records] == [(0, 0), (1, 0), (2, 0), (2, 1), (3, 0)]
    V.routing_figure(x[1], records[1], batch=1)
    cb = RoutingVisualizer(num_images=1, every_n_epochs=2, stages=[1, 2])
    cb.images = x[:1]
    added = []
    writer = SimpleNamespace(add_image=lambda *a: added.append(a[0]))
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=0, global_step=5,
                              loggers=[SimpleNamespace(experiment=writer)])
    cb.on_validation_epoch_end(trainer, SimpleNamespace(model=model))
    trainer.current_epoch = 1  # not a multiple of every_n_epochs: nothing
    cb.on_validation_epoch_end(trainer, SimpleNamespace(model=model))
    assert added == ["routing/stage1_bra/img0", "routing/stage2_bra/img0"]

    assert [m.training for m in model.modules()] == before_modes
    assert all(m.captured is None and m.capture is False for m in all_mixers(model))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats untouched
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref_out)


def _bomb_png(path):
    """A small PNG whose header claims 15000 x 15000 px: PIL refuses it as a decompression bomb."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 15000, 15000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case,message", [
    ("bomb", "cannot read image {tmp}/big.png: Image size (225000000 pixels) exceeds limit"),
    ("other_module", "{tmp}/m.ckpt is a Lightning checkpoint of another module (no ClassificationModule settings)"),
    ("unknown_model", "unknown model 'no_such_model'"),
])
def test_main_foreign_inputs_are_clean_errors(tmp_path, capsys, case, message):
    """Each was a traceback: PIL's DecompressionBombError, and (another LightningModule's checkpoint, or one
    whose settings build no model) the module's own errors from load_from_checkpoint."""
    write_image(tmp_path / "cat.png")
    _bomb_png(tmp_path / "big.png")
    ckpt = tmp_path / "m.ckpt"
    hparams = {"hidden": 3} if case == "other_module" else {"model": "no_such_model", "num_classes": 4}
    torch.save({"state_dict": {"layer.weight": torch.zeros(2, 2)}, "hyper_parameters": hparams,
                "pytorch-lightning_version": L.__version__}, ckpt)
    source = ["--model", "biformer_cpu_tiny"] if case == "bomb" else ["--ckpt_path", str(ckpt)]
    image = tmp_path / ("big.png" if case == "bomb" else "cat.png")
    rc = main(["visualize", *source, "--image", str(image), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: " + message.format(tmp=tmp_path)) and len(err.splitlines()) == 1, err


def test_main_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """--out "" is Path(""), the working folder: the pictures were written there, exit 0."""
    monkeypatch.chdir(tmp_path)
    write_image(tmp_path / "cat.png")
    assert main(["visualize", "--model", "biformer_cpu_tiny", "--image", "cat.png", "--out", ""]) == 2
    assert "argument --out: empty; allowed: a folder path" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["cat.png"]
