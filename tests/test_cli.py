"""The command line: dispatch, resume, DDP, bf16, init from released checkpoints, and bad input -> one `error:`
line and exit 2. In-process (biformer_lit.cli.main) unless the process itself is under test."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import torch

from biformer_lit.cli import main
from biformer_lit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "reference" / "official_biformer.pt"
# tiny runs: 64 px synthetic images, 4 training batches of 8, every step logged
SMALL = ["--data.img_size", "64", "--data.batch_size", "8", "--data.train_size", "32", "--data.val_size", "16",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1", "--model.warmup_steps", "1"]
TAGS = {"train/loss", "train/lr", "val/loss", "val/top1", "val/top5"}


def run(capsys, *args):
    """main(args) in this process: (exit status, stdout, stderr)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def bad(capsys, *args) -> str:
    """A command that must end in one error: exit 2, no traceback; its stderr."""
    code, _, err = run(capsys, *args)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 12, err
    return err


def cli(args, cwd, timeout=300):
    """`python cli.py ...` in a fresh process, as a user would run it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = {}
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_the_script_and_the_console_entry_point_answer_help_without_torch(tmp_path):
    """The process is the point: `python cli.py --help` and `report --help` answer without importing torch,
    a mistyped command or report flag is one error; pyproject names the console script."""
    out = cli(["--help"], tmp_path)
    assert out.returncode == 0 and all(c in out.stdout for c in ("fit", "validate", "report", "visualize", "export"))
    probe = ("import sys, runpy; sys.argv = ['cli.py'] + sys.argv[1:]; from biformer_lit.cli import main; "
             "code = main(); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(code)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args, code in ((["report", "--help"], 0), (["fti"], 2), (["report", "runs", "--outt", "x"], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == code, proc.stderr
        assert "torch imported" not in proc.stderr
    assert 'biformer-lit = "biformer_lit.cli:main"' in (REPO / "pyproject.toml").read_text()


def test_print_config_and_links(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "fit", "--config", str(REPO / "experiments" / "base.yaml"), "--print_config")
    assert code == 0 and "biformer_cpu_tiny" in out and "dataset: synthetic" in out and "AtomicCheckpointIO" in out
    assert "epoch_seed:" in out and "enabled: true" in out  # the per-epoch reseeding is part of the set-up
    # num_classes and img_size come from the data: the model's copies are link targets, not options
    assert "model.num_classes" in bad(capsys, "fit", "--model.num_classes", "3")


@pytest.mark.slow
def test_resume_from_last_continues_global_step(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1"]) == 0
    run_dir = tmp_path / "runs" / "default" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 4 and (run_dir / "config.yaml").exists()
    assert TAGS <= set(scalars(run_dir))
    assert main(["fit", *SMALL, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    second = torch.load(last, weights_only=True)
    assert second["global_step"] == 8 and second["epoch"] == 1  # continued, not restarted
    assert not (run_dir.parent / "version_1").exists()  # same run folder, so TensorBoard shows one curve
    steps = [s for s, _ in scalars(run_dir)["train/loss"]]
    assert max(steps) == 7 and sorted(set(steps)) == list(range(8))
    # finished: nothing to train, and it says how to train on
    capsys.readouterr()
    code, _, err = run(capsys, "fit", *SMALL, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert code == 0 and "the run is finished (trained 2 of max_epochs=2; to train on, pass a larger " \
                         "--trainer.max_epochs)" in err
    assert torch.load(last, weights_only=True)["global_step"] == 8
    # a checkpoint named by its path (here, relative) continues in its own version folder too
    assert main(["fit", *SMALL, "--trainer.max_epochs", "3", "--ckpt_path",
                 "runs/default/version_0/checkpoints/last.ckpt"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 12 and not (run_dir.parent / "version_1").exists()
    # evaluating it logs beside the run, in one folder however often it is called
    for _ in range(2):
        assert main(["validate", *SMALL, "--ckpt_path", "last"]) == 0
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    assert len(list((run_dir / "validate").glob("events.out.tfevents.*"))) == 2


def test_a_second_fit_of_the_same_run_is_refused_while_the_first_runs(monkeypatch, tmp_path, capsys):
    """Two `fit --ckpt_path last` of one run both wrote into one version folder (and one last.ckpt)."""
    import fcntl
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "runs" / "default" / "version_0" / "checkpoints" / "last.ckpt"
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]) == 0
    before = last.read_bytes()
    with open(last.parent.parent / ".lock", "a+") as other:  # the first fit, still running
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.truncate(0)
        other.write("pid 99 on node7")
        other.flush()
        err = bad(capsys, "fit", *SMALL, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert "runs/default/version_0 is in use by another process (pid 99 on node7)" in err
    assert last.read_bytes() == before


def test_evaluating_last_or_best_never_evaluates_an_untrained_model(monkeypatch, tmp_path, capsys):
    """`validate/test/predict --ckpt_path last` looked for last.ckpt in the new run's own (empty) version folder:
    it validated the untrained model after a Lightning warning, exit 0. `--ckpt_path best` was a traceback."""
    monkeypatch.chdir(tmp_path)
    for sub in ("validate", "test", "predict"):
        assert "--ckpt_path last: no checkpoints/last.ckpt" in bad(capsys, sub, *SMALL, "--ckpt_path", "last")
    for sub in ("validate", "fit"):
        assert "--ckpt_path best: a new" in bad(capsys, sub, *SMALL, "--ckpt_path", "best")
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("predictions.csv"))


def test_last_means_the_newest_run_that_saved_one(tmp_path):
    """As `fit --ckpt_path last` resumes: the newest version folder holding checkpoints/last.ckpt (a later
    evaluation's folder holds none); a logger pinned to one folder: that folder's."""
    from jsonargparse import Namespace
    from biformer_lit import lightning_cli
    for version, files in ((0, ["last.ckpt"]), (2, ["last.ckpt", "best-3.ckpt"]), (10, []), (11, ["x"])):
        (tmp_path / "exp" / f"version_{version}" / "checkpoints").mkdir(parents=True)
        for f in files:
            torch.save({"pytorch-lightning_version": lightning.__version__, "state_dict": {}},
                       tmp_path / "exp" / f"version_{version}" / "checkpoints" / f)

    def resolved(subcommand, path, version=None):
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                           init_args=Namespace(save_dir=str(tmp_path), name="exp", version=version))
        cfg = Namespace(trainer=Namespace(logger=logger), last_checkpoint=Namespace(dirpath=None), ckpt_path=path)
        lightning_cli.resolve_ckpt_path(subcommand, cfg)
        return cfg.ckpt_path

    newest = str(tmp_path / "exp" / "version_2" / "checkpoints" / "last.ckpt")
    assert resolved("validate", "last") == newest and resolved("fit", "last") == newest
    assert resolved("predict", "last", 0) == str(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt")
    assert resolved("fit", "last", 10) is None  # a fit finding none starts a new run
    with pytest.raises(UserError, match=r"no checkpoints/last.ckpt in .*version_10"):
        resolved("test", "last", 10)
    with pytest.raises(UserError, match=r"pass the file, e.g. .*version_2/checkpoints/best-3.ckpt$"):
        resolved("validate", "best")


@pytest.mark.slow
def test_bf16_mixed_via_cli(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1", "--trainer.precision", "bf16-mixed"]) == 0
    ck = torch.load(tmp_path / "runs/default/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ck["global_step"] == 4
    assert all(v.dtype == torch.float32 for v in ck["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_ddp_two_processes_sync_val_metrics(tmp_path):
    """2-process DDP (gloo): rank 0 logs the accuracy/loss of the whole val set, each image counted once.
    15 images: shards of 8 and 7 (Lightning's own sampler would pad rank 1's with a repeat of image 0,
    counting 16). The check recomputes both from the saved weights; it fails without metric syncing."""
    val_size = 15
    args = ["fit", *SMALL, "--data.val_size", str(val_size), "--trainer.max_epochs", "1",
            "--trainer.num_sanity_val_steps", "0", "--trainer.strategy", "ddp", "--trainer.devices", "2",
            "--trainer.accelerator", "cpu", "--model.ema_decay", "null"]
    res = cli(args, tmp_path, timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default" / "version_0"
    logged = scalars(run_dir)
    (_, top1), = logged["val/top1"]
    (_, loss), = logged["val/loss"]

    from biformer_lit.data import ImageDataModule
    from biformer_lit.module import ClassificationModule
    model = ClassificationModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=True).eval()
    dm = ImageDataModule(img_size=64, batch_size=8, train_size=32, val_size=val_size)
    dm.setup("validate")

    def metrics(idx):
        with torch.no_grad():
            x = torch.stack([dm.val_set[i][0] for i in idx])
            y = torch.tensor([dm.val_set[i][1] for i in idx])
            logits = model(x)
        return (100.0 * float((logits.argmax(-1) == y).float().mean()),
                float(torch.nn.functional.cross_entropy(logits, y)))

    full_top1, full_loss = metrics(range(val_size))
    assert abs(metrics(range(0, val_size, 2))[1] - full_loss) > 1e-3  # rank 0's shard alone would differ
    assert loss == pytest.approx(full_loss, abs=1e-4)
    assert top1 == pytest.approx(full_top1, abs=1e-3)  # k/15 is never a k'/16: a repeated image shows


def test_init_from_original_release_format(monkeypatch, tmp_path):
    if not FIXTURE.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"reference fixture missing: {FIXTURE}")
        pytest.skip(f"reference fixture not found at {FIXTURE}")
    from biformer_lit.lightning_cli import make_cli
    ref = torch.load(FIXTURE, weights_only=True)["legacy"]
    path = tmp_path / "biformer_tiny_release.pth"
    torch.save({"model": ref["state_dict"]}, path)  # the released files' layout and key names
    monkeypatch.chdir(tmp_path)
    kwargs = {"depths": [1, 1, 2, 1], "embed_dims": [32, 64, 128, 256]}  # the fixture's reduced biformer_tiny
    c = make_cli(["--model.model", "biformer_tiny", "--model.model_kwargs", json.dumps(kwargs),
                  "--model.init_from", str(path), "--model.ema_decay", "0.9",
                  "--data.num_classes", "10", "--data.img_size", "224"], run=False)
    c.model.setup("validate")
    with torch.no_grad():
        logits = c.model.eval()(ref["input"])
        ema_logits = c.model.ema.module.eval()(ref["input"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ema_logits, ref["logits"], atol=1e-4, rtol=0)


# --- bad input: `error: <message>` on stderr, exit status 2, no traceback ---------------------------
def _png(path: Path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (36, 36), (120, 30, 200)).save(path)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(2):
                _png(root / "corrupt" / split / cls / f"{i}.png")
        (root / "corrupt" / split / "a" / "broken.png").write_bytes(b"not an image")
        _png(root / "empty" / split / "b" / "0.png")
        (root / "empty" / split / "a").mkdir(parents=True, exist_ok=True)
    from biformer_lit.module import create_model
    ten = create_model("biformer_cpu_tiny", 10, 32, 0.0).state_dict()
    torch.save({"model": ten}, root / "ten_classes.pth")
    (root / "random.ckpt").write_bytes(bytes(range(256)) * 20)
    (root / "truncated.ckpt").write_bytes((root / "ten_classes.pth").read_bytes()[:50_000])
    # a Lightning checkpoint of the same model with 10 classes: resuming it into a 4-class run
    torch.save({"pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
                "state_dict": {f"model.{k}": v for k, v in ten.items()}}, root / "ten_classes.ckpt")
    torch.save({"pytorch-lightning_version": lightning.__version__, "state_dict": {}, "hyper_parameters":
                {"obj": argparse.Namespace(lr=1)}}, root / "pickled.ckpt")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "run" / "checkpoints").mkdir(parents=True)
    return root


FOLDER = ["--data.dataset", "imagefolder", "--trainer.max_epochs", "1"]
# case -> (arguments, what the error must name); {root}: the fixture's folder. Each used to be a traceback, a
# silent misbehaviour, or (the parser's) pages of usage.
BAD = {
    "missing_dataset": (["fit", *FOLDER, "--data.root", "{root}/nowhere"], "{root}/nowhere does not exist"),
    "empty_class": (["fit", *FOLDER, "--data.root", "{root}/empty"], "has no images"),
    "corrupt_image": (["fit", *FOLDER, "--data.root", "{root}/corrupt", "--data.batch_size", "2"], "broken.png"),
    "class_count": (["fit", "--model.init_from", "{root}/ten_classes.pth"], "10 classes but the model has 4"),
    "missing_ckpt": (["fit", "--ckpt_path", "{root}/gone.ckpt"], "{root}/gone.ckpt"),
    "corrupt_ckpt": (["fit", "--ckpt_path", "{root}/random.ckpt"], "random.ckpt: not a readable PyTorch checkpoint"),
    "empty_ckpt": (["fit", "--ckpt_path", "{root}/empty.ckpt"], "empty.ckpt: not a readable PyTorch checkpoint"),
    "truncated_ckpt": (["validate", "--ckpt_path", "{root}/truncated.ckpt"], "truncated.ckpt: not a readable"),
    "pickled_ckpt": (["fit", "--ckpt_path", "{root}/pickled.ckpt"], "argparse.Namespace"),
    "weights_as_ckpt": (["fit", "--ckpt_path", "{root}/ten_classes.pth"], "--model.init_from {root}/ten_classes.pth"),
    "ckpt_other_classes": (["fit", "--ckpt_path", "{root}/ten_classes.ckpt"], "model.head.bias (10,) vs (4,)"),
    "missing_init": (["validate", "--model.init_from", "{root}/gone.pth"], "{root}/gone.pth"),
    "empty_init": (["fit", "--model.init_from", ""], "model.init_from"),
    "unknown_key": (["fit", "--model.no_such_option", "1"], "--model.no_such_option"),
    "wrong_type": (["fit", "--trainer.max_epochs", "ten"], "trainer.max_epochs"),
    "abbreviated": (["fit", "--trainer.max_epoc", "1"], "--trainer.max_epoc 1 (did you mean --trainer.max_epochs?)"),
    "option_typo": (["fit", "--model.lrr", "0.1"], "--model.lrr 0.1 (did you mean --model.lr?)"),
    "kwargs_typo": (["fit", "--model.model_kwargs", '{"topk": 2}'], "Unexpected keys: {'topk'}"),
    "kwargs_of_the_data": (["fit", "--model.model_kwargs", '{"num_classes": 5}'], "'num_classes'"),
    "kwargs_in_chans": (["fit", "--model.model_kwargs", '{"in_chans": 1}'], "'in_chans'"),
    "kwargs_pretrained": (["fit", "--model.model_kwargs", '{"pretrained": true}'], "'pretrained'"),
    "kwargs_drop_path_rate": (["fit", "--model.model_kwargs", '{"drop_path_rate": 0.3}'], "'drop_path_rate'"),
    "kwargs_for_another_model": (["fit", "--model.model", "resnet10t", "--model.model_kwargs", '{"depths": 2}'],
                                 "model 'resnet10t' takes none"),
    "unknown_model": (["fit", "--model.model", "no_such_model"], "unknown model 'no_such_model'"),
    "bad_topk": (["fit", "--model.model_kwargs", '{"topks": [99, 4, 2, 1]}'], "topk=99"),
    "batch_too_big": (["fit", "--data.batch_size", "64"], "batch_size=64 is larger than the 32 training images"),
    "negative_lr": (["fit", "--model.lr", "-1"], "model.lr"),
    "infinite_eps": (["fit", "--model.eps", ".inf"], "model.eps"),
    "lr_below_min_lr": (["fit", "--model.lr", "1e-4", "--model.min_lr", "1e-3"], "min_lr=0.001 is above lr=0.0001"),
    "betas": (["fit", "--model.betas", "[0.9, 1.0]"], "model.betas"),
    "ema_decay": (["fit", "--model.ema_decay", "2.0"], "model.ema_decay"),
    "flex_on_cpu": (["fit", "--model.model_kwargs", '{"attn_backend": "flex"}'], "attn_backend='flex'"),
    "dataset": (["fit", "--data.dataset", "mnist"], "data.dataset"),
    "batch_size_0": (["fit", "--data.batch_size", "0"], "data.batch_size"),
    "random_erasing": (["fit", "--data.random_erasing", "2.0"], "data.random_erasing"),
    "data_seed": (["fit", "--data.seed", str(10**23)], "data.seed"),
    "seed": (["fit", "--seed_everything", "-5"], "seed_everything=-5"),
    "rand_augment": (["fit", *FOLDER, "--data.root", "{root}/corrupt", "--data.rand_augment", "randx"], "randx"),
    "no_root": (["fit", "--data.dataset", "cifar10"], "needs --data.root"),
    "duplicate_yaml_key": (["fit", "--config", "{root}/twice.yaml"], "key model.lr is given twice"),
    "binary_config": (["validate", "--config", "{root}/ten_classes.pth"], "is not UTF-8 text; allowed: a YAML file"),
    "ckpt_empty": (["fit", "--ckpt_path="], "--ckpt_path is empty"),
    "ckpt_folder": (["fit", "--ckpt_path", "{root}/run"], "--ckpt_path {root}/run is a folder"),
    "ckpt_hpc": (["fit", "--ckpt_path", "hpc"], "--ckpt_path hpc: no hpc_ckpt_*.ckpt"),
    "accumulate_0": (["fit", "--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches=0"),
    "accumulate_negative": (["fit", "--trainer.accumulate_grad_batches", "-1"], "trainer.accumulate_grad_batches=-1"),
    "val_check_0": (["fit", "--trainer.val_check_interval", "0"], "trainer.val_check_interval=0"),
    "clip_negative": (["fit", "--trainer.gradient_clip_val", "-1.0"], "trainer.gradient_clip_val=-1.0"),
    "ablation_flag_without_arms": (["fit", "--ablation.only=a"], "no config has ablation arms"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_error_line(bad_files, monkeypatch, tmp_path, capsys, case):
    monkeypatch.chdir(tmp_path)
    (bad_files / "twice.yaml").write_text("model:\n  lr: 0.1\n  lr: 0.2\n")
    args, named = BAD[case]
    args = [a.replace("{root}", str(bad_files)) for a in args]
    err = bad(capsys, args[0], *SMALL, *args[1:])
    assert named.replace("{root}", str(bad_files)) in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_full_disk_is_a_short_error(monkeypatch, tmp_path, capsys):
    """Writing last.ckpt fails with ENOSPC (the temp file goes to /dev/full): one `error:` line naming the
    file, exit 2, no traceback."""
    from test_module import write_to_full_disk
    monkeypatch.chdir(tmp_path)
    write_to_full_disk(monkeypatch)
    err = bad(capsys, "fit", *SMALL, "--trainer.max_epochs", "1")
    assert re.search(r"error: cannot write \S*/checkpoints/\S*\.ckpt: No space left on device", err)


def test_a_disk_full_at_start_names_the_run_folder_and_leaves_no_empty_record(monkeypatch, tmp_path, capsys):
    """Lightning's first writes (config.yaml, hparams.yaml) name no file when the disk is full: the error said
    `No space left on device` alone and left a 0-byte hparams.yaml, which Lightning never rewrites."""
    import errno
    import yaml as pyyaml
    monkeypatch.chdir(tmp_path)

    def full(*args, **kwargs):
        stream = args[1] if len(args) > 1 else kwargs.get("stream")
        if stream is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    real = pyyaml.dump
    monkeypatch.setattr(pyyaml, "dump", full)
    err = bad(capsys, "fit", *SMALL, "--trainer.max_epochs", "1")
    assert "error: cannot write runs/default/version_0: No space left on device" in err
    assert not [p for p in tmp_path.rglob("*.yaml") if p.stat().st_size == 0]


def test_an_error_from_a_loader_worker_is_reported_by_its_own_message():
    from biformer_lit.cli import message
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    raise UserError(m)\n"
                        "biformer_lit.errors.UserError: cannot read image a/bad.png: truncated\n")
    assert message(wrapped) == "cannot read image a/bad.png: truncated"
    assert message(UserError("plain message")) == "plain message"


def test_evaluating_a_checkpoint_on_other_data_settings_warns(tmp_path, capsys):
    """Lightning restores a checkpoint's model settings, not its data settings: say when they differ."""
    from biformer_lit.lightning_cli import _warn_other_data
    path = tmp_path / "run.ckpt"
    trained = {"img_size": 96, "num_classes": 4, "dataset": "synthetic"}
    _warn_other_data(str(path), trained, {"img_size": 64, "num_classes": None, "dataset": "synthetic"})
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path} was trained with data.img_size=96 (now 64);") and "num_classes" not in err
    _warn_other_data(str(path), trained, {"img_size": 96, "num_classes": None, "dataset": "synthetic"})
    assert capsys.readouterr().err == ""


def test_validate_last_in_a_fixed_empty_checkpoint_folder_is_a_short_error(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    err = bad(capsys, "validate", *SMALL, f"--last_checkpoint.dirpath={tmp_path / 'ck'}", "--ckpt_path=last")
    assert f"--ckpt_path last: no checkpoints/last.ckpt in {tmp_path / 'ck'}" in err


@pytest.mark.parametrize("where", [["--trainer.logger.init_args.version", "0"],  # as an ablation arm's config.yaml
                                   ["--last_checkpoint.dirpath", "runs/default/version_0/checkpoints"],
                                   ["--trainer.logger", "false", "--trainer.default_root_dir",
                                    "runs/default/version_0"]])
def test_a_new_fit_does_not_overwrite_a_runs_last_checkpoint(monkeypatch, tmp_path, capsys, where):
    """A fit without --ckpt_path into a fixed checkpoint folder overwrote that run's last.ckpt (Lightning only
    warned that the folder is not empty) and appended a second curve to its event files."""
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "runs" / "default" / "version_0" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"an earlier run's checkpoint")
    err = bad(capsys, "fit", *SMALL, "--trainer.max_epochs", "1", *where)
    assert f"{last} holds an earlier run's last checkpoint" in err
    assert last.read_bytes() == b"an earlier run's checkpoint" and not list(last.parent.parent.glob("events.*"))


def test_slurm_variables_outside_a_job_step_are_a_short_error(monkeypatch, tmp_path, capsys):
    """SLURM_NTASKS=2 left in the environment (e.g. a shell of an allocation, without srun): Lightning's
    RuntimeError from Trainer() ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    err = bad(capsys, "fit", *SMALL, "--trainer.max_epochs", "1")
    assert "the trainer cannot start" in err and "SLURM_NTASKS" in err and not list(tmp_path.rglob("*.ckpt"))


def test_evaluating_without_weights_says_so(monkeypatch, tmp_path, capsys):
    """validate / test / predict with neither --ckpt_path nor --model.init_from evaluated random weights silently."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "validate", *SMALL, "--trainer.limit_val_batches", "1")
    assert code == 0 and "warning: validate without --ckpt_path or --model.init_from" in err


def test_a_run_prints_one_line_per_epoch_and_no_advertising(monkeypatch, tmp_path, capsys, caplog):
    """Every arm printed Lightning's product tip and a model summary with `0 Total Flops`, and nothing while it
    trained (the progress bar off)."""
    monkeypatch.chdir(tmp_path)
    args = SMALL[:SMALL.index("--trainer.enable_model_summary")] + SMALL[SMALL.index("--trainer.enable_model_summary") + 2:]
    assert main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Tip" not in out + err + caplog.text and "litlogger" not in out + err + caplog.text
    assert re.search(r"^epoch 1/1  train loss \d\.\d{4}  val top-1 \d+\.\d\d%  elapsed", out, re.M)  # no bar: lines
    assert "0         Total Flops" not in out + err
