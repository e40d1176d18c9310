"""ClassificationModule (recipe, metrics, init_from) and the atomic checkpoint IO, in-process."""
import math
import os

import lightning as L
import pytest
import torch
from torch import nn

from biformer_lit.checkpoint import AtomicCheckpointIO, load_init_weights
from biformer_lit.data import ImageDataModule
from biformer_lit.errors import UserError
from biformer_lit.module import ClassificationModule, create_model, param_groups, warmup_cosine

TAGS = ["train/loss", "train/lr", "val/loss", "val/top1", "val/top5"]


def data(**kw):
    args = dict(dataset="synthetic", img_size=64, batch_size=8, train_size=32, val_size=16, seed=0)
    return ImageDataModule(**dict(args, **kw))


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                log_every_n_steps=1, default_root_dir=tmp_path)
    return L.Trainer(**dict(args, **kw))


def module(dm, **kw):
    return ClassificationModule(**dict(dict(num_classes=dm.num_classes, img_size=dm.img_size), **kw))


# --- recipe pieces ---------------------------------------------------------------------------------
def test_weight_decay_groups_skip_1d_params_and_no_weight_decay_names():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
            self.table = nn.Parameter(torch.zeros(3, 4))  # 2-D, but named by no_weight_decay()

        def no_weight_decay(self):
            return {"table"}

    decay, no_decay = param_groups(Net(), 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    net = Net()
    decay, no_decay = param_groups(net, 0.05)
    assert {id(p) for p in decay["params"]} == {id(net.fc.weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net.fc.bias), id(net.norm.weight), id(net.norm.bias),
                                                     id(net.table)}


def test_warmup_then_cosine_to_min_ratio():
    f = warmup_cosine(warmup=4, total=20, min_ratio=0.02)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(12) == pytest.approx(0.02 + 0.98 * 0.5)  # half-way through the cosine
    assert f(20) == pytest.approx(0.02) and f(99) == pytest.approx(0.02)
    values = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_img_size_only_for_models_that_take_it():
    assert create_model("biformer_cpu_tiny", 3, 32, 0.0).img_size == (32, 32)
    assert create_model("resnet10t", 3, 32, 0.0).num_classes == 3  # ResNets have no img_size argument
    assert create_model("swin_tiny_patch4_window7_224", 3, 64, 0.0).patch_embed.img_size == (64, 64)
    with pytest.raises(UserError, match="'no_such_model'"):
        create_model("no_such_model", 3, 32, 0.0)
    with pytest.raises(UserError, match="'resnet10t' takes none"):  # model_kwargs are BiFormer's settings
        create_model("resnet10t", 3, 32, 0.0, {"depths": 2})


def test_model_kwargs_name_every_biformer_setting_but_those_of_the_data_and_recipe():
    """The typed model configuration follows BiFormer's constructor: a new knob is a parser key at once."""
    import inspect
    from biformer_lit.models import BiFormer
    from biformer_lit.models.config import NOT_SETTINGS, BiFormerKwargs
    params = set(inspect.signature(BiFormer).parameters)
    assert set(BiFormerKwargs.__annotations__) == params - set(NOT_SETTINGS)


@pytest.mark.parametrize("flag,value", [
    ("lr", "-1.0"), ("lr", ".inf"), ("eps", ".inf"), ("drop_path", "1.5"), ("label_smoothing", "1.5"),
    ("ema_decay", "2.0"), ("mixup_prob", "1.2"), ("betas", "[0.9, 1.0]"), ("warmup_steps", "-3"),
    ("warmup_epochs", ".inf"), ("weight_decay", "-0.1"), ("mixup", ".inf"), ("base_batch_size", "0"),
    ("init_from", ""),  # ignored (--model.init_from=$INIT with INIT unset): a run from random weights
    ("model_kwargs", "{features_only: true}"), ("model_kwargs", "{pretrained: true}"),
])
def test_recipe_settings_out_of_range_are_rejected_before_anything_is_built(flag, value, capsys):
    """Each used to fail mid-run (AdamW, the loss, drop path) with a traceback, or (EMA, eps=inf) train silently:
    now the parser refuses it, naming the key."""
    from biformer_lit.cli import main
    assert main(["fit", f"--model.{flag}", value, "--print_config"]) == 2
    assert f"model.{flag}" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"min_lr=0.001 is above lr=0.0001; allowed: min_lr <= lr"):
        ClassificationModule(lr=1e-4, min_lr=1e-3)  # two settings: the constructor's


def test_resuming_with_more_epochs_uses_the_new_schedule_from_the_first_step(tmp_path):
    """The restored optimizer held the old schedule's final lr for one step (seen: 1e-5 instead of 2.6e-4)."""
    class FirstLr(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    dm = data()  # 4 batches per epoch
    kw = dict(lr=1e-3, min_lr=1e-5, scale_lr=False, warmup_steps=0, mixup=0.0, cutmix=0.0)
    short = trainer(tmp_path, max_steps=-1, max_epochs=1, enable_checkpointing=True, limit_val_batches=0)
    short.fit(module(dm, **kw), datamodule=dm)
    ckpt = tmp_path / "one_epoch.ckpt"
    short.save_checkpoint(ckpt)
    spy = FirstLr()
    longer = trainer(tmp_path, max_steps=-1, max_epochs=3, limit_val_batches=0, callbacks=[spy])
    longer.fit(module(dm, **kw), datamodule=dm, ckpt_path=str(ckpt))
    step, lr = spy.seen[0]
    assert step == 4
    assert lr == pytest.approx(1e-3 * warmup_cosine(0, 12, 1e-2)(4))  # 12 steps now, not the old 4

    # resumed with another global batch: the lr is scaled for the new batch (it kept the old base lr)
    spy, dm16 = FirstLr(), data(batch_size=16)  # 2 batches per epoch: 6 steps in 3 epochs
    scaled = dict(kw, scale_lr=True, base_batch_size=8)
    again = trainer(tmp_path, max_steps=-1, max_epochs=3, limit_val_batches=0, callbacks=[spy])
    with pytest.warns(UserWarning, match=r"resumed with another global batch: base lr 0.001 -> 0.002"):
        again.fit(module(dm16, **scaled), datamodule=dm16, ckpt_path=str(ckpt))
    assert spy.seen[0][1] == pytest.approx(2e-3 * warmup_cosine(0, 6, 1e-2)(4))


def test_schedule_problems_are_said_not_silent(tmp_path):
    """Warmup as long as the run (the lr never decays), an odd batch under Mixup (an image dropped per
    batch), and an unbounded run (the cosine has no length: was an OverflowError traceback)."""
    dm = data(batch_size=5, train_size=20)
    with pytest.warns(UserWarning) as seen:
        trainer(tmp_path, max_steps=-1, max_epochs=1).fit(module(dm, warmup_epochs=5.0), datamodule=dm)
    messages = [str(w.message) for w in seen]
    assert any("warmup (20 steps) covers the whole run (4 steps)" in m for m in messages), messages
    assert any("batch_size=5 is odd: Mixup/CutMix pair images" in m for m in messages), messages
    with pytest.raises(UserError, match="max_epochs=-1"):
        trainer(tmp_path, max_steps=-1, max_epochs=-1).fit(module(dm), datamodule=dm)


def test_lr_scaled_by_global_batch_and_logged(tmp_path):
    dm = data(batch_size=8)
    m = module(dm, lr=1e-3, warmup_steps=0, mixup=0.0, cutmix=0.0)
    seen = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(float(trainer.callback_metrics["train/lr"]))

    trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[Record()], limit_val_batches=0).fit(m, dm)
    peak = 1e-3 * 8 * 2 / 512  # batch x accumulation x world size (1) / 512
    assert seen[0] == pytest.approx(peak)
    assert m.trainer.optimizers[0].param_groups[0]["lr"] < peak  # cosine has started


def test_mixup_survives_an_odd_batch(tmp_path):
    # timm's Mixup needs an even batch; a last odd batch (no drop_last) must not crash the epoch
    from torch.utils.data import DataLoader, TensorDataset
    ds = TensorDataset(torch.randn(5, 3, 32, 32), torch.randint(0, 4, (5,)))
    m = ClassificationModule(num_classes=4, img_size=32, mixup=0.8, cutmix=1.0, warmup_steps=0)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="lr not scaled"):  # no datamodule: batch size unknown
        t.fit(m, DataLoader(ds, batch_size=5))
    assert math.isfinite(float(t.callback_metrics["train/loss"]))


# --- short fits ------------------------------------------------------------------------------------
PRESET_CASES = [
    ("biformer_cpu_tiny", 64, {}),
    ("biformer_cpu_small", 64, {}),
    ("biformer_cpu_stl", 64, dict(n_wins=[4, 4, 2, 1], topks=[1, 4, 4, 1])),
    # the paper's layouts at reduced width; n_wins/topks sized to 64 px maps (16, 8, 4, 2)
    ("biformer_stl", 64, dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1], n_wins=[4, 4, 2, 1],
                              topks=[4, 4, 2, 1])),
    ("biformer_tiny", 64, dict(embed_dims=[32, 64, 128, 256], depths=[1, 1, 1, 1], n_wins=[4, 4, 2, 1],
                               topks=[4, 4, 2, 1])),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,img_size,kwargs", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_short_fit_logs_every_tag(tmp_path, name, img_size, kwargs):
    dm = data(img_size=img_size)
    m = module(dm, model=name, model_kwargs=kwargs, warmup_steps=1)
    t = trainer(tmp_path, max_steps=3, val_check_interval=3)
    t.fit(m, dm)
    got = t.callback_metrics
    assert set(TAGS) <= set(got), sorted(got)
    assert all(math.isfinite(float(got[k])) for k in TAGS)
    assert 0.0 <= float(got["val/top1"]) <= float(got["val/top5"]) <= 100.0
    assert t.global_step == 3


@pytest.mark.slow
def test_ema_test_and_predict(tmp_path):
    dm = data()
    m = module(dm, ema_decay=0.5, warmup_steps=0, drop_path=0.0)
    t = trainer(tmp_path, max_steps=2, val_check_interval=2)
    t.fit(m, dm)
    assert {"val_ema/top1", "val_ema/top5"} <= set(t.callback_metrics)
    ema, live = m.ema.module.state_dict(), m.model.state_dict()
    assert any(not torch.equal(ema[k], live[k]) for k in live if live[k].is_floating_point())
    assert not any(p.requires_grad for p in m.ema.parameters())
    # the EMA weights are part of the checkpoint, so a resumed run keeps its average
    path = tmp_path / "m.ckpt"
    t.save_checkpoint(path)
    back = ClassificationModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(back.ema.module.head.weight, m.ema.module.head.weight)
    res = trainer(tmp_path, limit_test_batches=1).test(m, dm, verbose=False)[0]
    assert set(res) >= {"test/top1", "test/top5"} and 0 <= res["test/top1"] <= 100
    probs = trainer(tmp_path, limit_predict_batches=1).predict(m, dm)[0]
    assert probs.shape == (8, dm.num_classes)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8))
    # and written down: LightningCLI's `predict` discards the returned tensors
    import csv
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    labels = next(iter(dm.predict_dataloader()))[1].tolist()
    assert [int(r["index"]) for r in rows] == list(range(8)) and [int(r["label"]) for r in rows] == labels
    assert [int(r["predicted"]) for r in rows] == probs.argmax(-1).tolist()
    assert [float(r["probability"]) for r in rows] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-6)


def test_predictions_name_the_images_of_a_process_share(tmp_path):
    """Under DDP a process predicts images r, r + world, ... (EvalShardSampler): its predictions_rank<r>.csv
    wrote 0, 1, 2, ... as their "index in the split". Rank 1 of 2, in one process: indices 1, 3, 5, ..."""
    import csv
    from torch.utils.data import DataLoader
    from biformer_lit.data.sampler import EvalShardSampler
    dm = data()
    dm.setup()
    loader = DataLoader(dm.test_set, batch_size=4, sampler=EvalShardSampler(len(dm.test_set), rank=1, world=2))
    m = module(dm)
    trainer(tmp_path, limit_predict_batches=2).predict(m, loader)
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert [int(r["index"]) for r in rows] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert [int(r["label"]) for r in rows] == [dm.test_set[int(r["index"])][1] for r in rows]


@pytest.mark.slow
def test_bf16_mixed_on_cpu(tmp_path):
    dm = data()
    t = trainer(tmp_path, precision="bf16-mixed", max_steps=2, val_check_interval=2)
    t.fit(module(dm, warmup_steps=0), dm)
    assert math.isfinite(float(t.callback_metrics["train/loss"]))
    assert math.isfinite(float(t.callback_metrics["val/top1"]))


# --- init_from -------------------------------------------------------------------------------------
def tiny(num_classes=4):
    return ClassificationModule(num_classes=num_classes, img_size=32, drop_path=0.0)


@pytest.mark.parametrize("layout", ["lightning", "bare", "release"])
def test_init_from_each_layout(tmp_path, layout):
    src = tiny()
    path = tmp_path / "w.pt"
    sd = src.model.state_dict()
    obj = {"lightning": {"state_dict": src.state_dict(), "epoch": 3}, "bare": sd, "release": {"model": sd}}[layout]
    torch.save(obj, path)
    dst = ClassificationModule(num_classes=4, img_size=32, drop_path=0.0, init_from=str(path), ema_decay=0.9)
    assert not torch.equal(dst.model.head.weight, src.model.head.weight)  # loaded in setup(), not __init__
    dst.setup("fit")
    for k, v in sd.items():
        assert torch.equal(dst.model.state_dict()[k], v), k
    assert torch.equal(dst.ema.module.head.weight, src.model.head.weight)  # the EMA starts from them too


def test_init_from_head_mismatch_names_both_counts(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save({"model": tiny(10).model.state_dict()}, path)
    with pytest.raises(UserError, match=r"10 classes but the model has 4"):
        load_init_weights(tiny(4).model, str(path))
    m = tiny(4)
    before = m.model.head.weight.clone()
    load_init_weights(m.model, str(path), ignore_head=True)
    assert torch.equal(m.model.head.weight, before)  # the new head is kept
    assert torch.equal(m.model.stem.conv.weight, torch.load(path, weights_only=True)["model"]["stem.conv.weight"])


def test_init_from_rejects_other_models_missing_files_and_pickles(tmp_path):
    other = tmp_path / "other.pt"
    torch.save(ClassificationModule(model="biformer_cpu_small", num_classes=4, img_size=32).model.state_dict(), other)
    with pytest.raises(UserError, match="does not fit model"):
        load_init_weights(tiny().model, str(other))
    with pytest.raises(UserError, match="nope.pt"):
        load_init_weights(tiny().model, str(tmp_path / "nope.pt"))
    with pytest.raises(UserError, match=f"{tmp_path} is a folder; allowed: a checkpoint file"):  # "not found"
        load_init_weights(tiny().model, str(tmp_path))
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": tiny().model.state_dict(), "args": Opaque()}, pickled)
    with pytest.raises(UserError, match=r"pickled.pt: holds more than tensors and plain values \(pickled "
                                              r"test_module.Opaque\); refused by the safe loader"):
        load_init_weights(tiny().model, str(pickled))


class Opaque:  # an arbitrary pickled object: what weights_only=True refuses to load
    pass


# --- atomic checkpoint writes ----------------------------------------------------------------------
def test_atomic_save_replaces_whole_files_and_loads_safely(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode

    def killed(obj, f, *a, **k):  # dies half-way through writing
        f.write(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1  # the previous checkpoint, intact
    assert os.listdir(path.parent) == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"step": 3, "x": Opaque()}, path)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        io.load_checkpoint(path)


def write_to_full_disk(monkeypatch):
    """The checkpoint's temp file writes to /dev/full: every write fails with ENOSPC, as on a full disk."""
    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: (os.close(fd), real(os.open("/dev/full", os.O_WRONLY), mode))[1])


def test_atomic_save_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    (tmp_path / ".last.ckpt.k1ll3d.tmp").write_bytes(b"x" * 1000)  # left by a killed write: removed next time
    (tmp_path / ".best-0.ckpt.k1ll3d.tmp").write_bytes(b"x")  # another file's: only its own writes remove it
    with monkeypatch.context() as m:
        write_to_full_disk(m)
        with pytest.raises(OSError, match="No space left on device") as info:
            io.save_checkpoint({"step": 2, "w": torch.ones(100_000)}, path)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "previous checkpoint is kept" in str(info.value)
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == [".best-0.ckpt.k1ll3d.tmp", "last.ckpt"]


def test_skipped_corrupt_images_are_reported_each_epoch(tmp_path):
    from test_data import _image_folder
    from biformer_lit.data import ImageDataModule
    root = _image_folder(tmp_path, per_class=4)
    (root / "train" / "a" / "2.png").write_bytes(b"not a png")
    dm = ImageDataModule("imagefolder", root=str(root), img_size=64, batch_size=2, skip_corrupt=True)
    module = ClassificationModule(num_classes=dm.num_classes, img_size=64, mixup=0, cutmix=0, drop_path=0.0)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"epoch 0: 1 unreadable image\(s\) skipped") as record:
        trainer.fit(module, datamodule=dm)
    assert any("epoch 1: 1 unreadable image(s) skipped (--data.skip_corrupt; 2 so far)" in str(w.message) for w in record)


def test_best_top5_is_that_of_the_best_top1_validation():
    """best/val_top5 is the top-5 of the validation that gave the best top-1 (the kept checkpoint, as the
    report reads it), not the highest top-5 of any validation."""
    from types import SimpleNamespace
    from biformer_lit.callbacks.run_stats import RunStats
    stats = RunStats()
    for top1, top5 in [(50.0, 70.0), (40.0, 90.0), (50.0, 95.0)]:  # a tie does not replace the first best
        stats.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={
            "val/top1": torch.tensor(top1), "val/top5": torch.tensor(top5)}), None)
    assert stats.best == {"val/top1": 50.0, "val/top5": 70.0}


def test_progress_lines_name_the_epoch_loss_top1_and_both_etas(monkeypatch):
    import json
    from biformer_lit.callbacks.progress import PROGRESS_ENV, EpochProgress
    monkeypatch.setenv(PROGRESS_ENV, json.dumps(dict(label="k1/seed_0", runs_after=4, parallel=2, started=1000.0)))
    p = EpochProgress()
    p._start, p._first_epoch = 1100.0, 0
    # 3 of 12 epochs in 60 s: 180 s left for the arm; 4 more runs of 240 s, 2 at a time: 480 s + 180 s
    assert p.line(3, 12, 1.23456, 45.611, now=1160.0) == (
        "[k1/seed_0] epoch 3/12  train loss 1.2346  val top-1 45.61%  elapsed 1m00s  ETA arm 3m00s, "
        "ablation 11m00s (elapsed 2m40s)")
    monkeypatch.delenv(PROGRESS_ENV)
    plain = EpochProgress()
    plain._start, plain._first_epoch = 0.0, 2  # resumed at epoch 2: the rate counts this process's epochs only
    assert plain.line(4, 4, None, None, now=30.0) == "epoch 4/4  elapsed 30s  ETA arm 0s"
