"""The command line: resume, DDP, bf16, init from released checkpoints, and bad input -> `error:` + exit 2."""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning
import pytest
import torch

from biformer_lit.cli import main, make_cli

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "reference" / "official_biformer.pt"
# tiny runs: 32 px synthetic images, 4 training batches of 8, every step logged
SMALL = ["--data.img_size", "64", "--data.batch_size", "8", "--data.train_size", "32", "--data.val_size", "16",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1", "--model.warmup_steps", "1"]
TAGS = {"train/loss", "train/lr", "train/images_per_sec", "val/loss", "val/top1", "val/top5"}


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


def test_base_config_and_links(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(REPO / "experiments" / "base.yaml"), "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "biformer_cpu_tiny" in out and "dataset: synthetic" in out and "AtomicCheckpointIO" in out
    # num_classes and img_size come from the data: the model's copies are link targets, not options
    with pytest.raises(SystemExit) as e:
        main(["fit", "--model.num_classes", "3"])
    assert e.value.code == 2


def test_dispatch_and_ablation_hook(monkeypatch, tmp_path):
    import types
    monkeypatch.chdir(tmp_path)
    calls = []
    fake = types.ModuleType("biformer_lit.ablation")
    fake.AblationError = type("AblationError", (ValueError,), {})
    fake.maybe_run_ablation = lambda argv: calls.append(argv) or (7 if "--ablate" in argv else None)
    monkeypatch.setitem(sys.modules, "biformer_lit.ablation", fake)
    assert main(["fit", "--ablate"]) == 7
    with pytest.raises(SystemExit) as e:  # not an ablation: on to LightningCLI
        main(["fit", "--print_config"])
    assert e.value.code == 0 and len(calls) == 2
    for sub in ("report", "visualize"):
        try:
            code = main([sub, "--help"])
        except SystemExit as e:
            code = e.code
        assert code == 0


@pytest.mark.slow
def test_resume_from_last_continues_global_step(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1"]) == 0
    run = tmp_path / "runs" / "default" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 4 and (run / "config.yaml").exists()
    assert TAGS <= set(scalars(run))
    assert main(["fit", *SMALL, "--trainer.max_epochs", "2", "--ckpt_path", "last"]) == 0
    second = torch.load(last, weights_only=True)
    assert second["global_step"] == 8 and second["epoch"] == 1  # continued, not restarted
    assert not (run.parent / "version_1").exists()  # same run folder, so TensorBoard shows one curve
    steps = [s for s, _ in scalars(run)["train/loss"]]
    assert max(steps) == 7 and sorted(set(steps)) == list(range(8))
    # a checkpoint named by its path (here, relative) continues in its own version folder too
    assert main(["fit", *SMALL, "--trainer.max_epochs", "3", "--ckpt_path",
                 "runs/default/version_0/checkpoints/last.ckpt"]) == 0
    assert torch.load(last, weights_only=True)["global_step"] == 12 and not (run.parent / "version_1").exists()


def test_evaluating_last_or_best_never_evaluates_an_untrained_model(monkeypatch, tmp_path, capsys):
    """`validate/test/predict --ckpt_path last` looked for last.ckpt in the new run's own (empty) version folder:
    it validated the untrained model after a Lightning warning, exit 0. `--ckpt_path best` was a traceback."""
    monkeypatch.chdir(tmp_path)
    for sub in ("validate", "test", "predict"):
        assert main([sub, *SMALL, "--ckpt_path", "last"]) == 2
        assert "error: --ckpt_path last: no checkpoints/last.ckpt under runs/default/version_*" in capsys.readouterr().err
    for sub in ("validate", "fit"):
        assert main([sub, *SMALL, "--ckpt_path", "best"]) == 2
        assert "error: --ckpt_path best: a new" in capsys.readouterr().err


def test_last_means_the_newest_run_that_saved_one(tmp_path):
    """As `fit --ckpt_path last` resumes: the newest version folder holding checkpoints/last.ckpt (a later
    evaluation's folder holds none); a logger pinned to one folder: that folder's."""
    from jsonargparse import Namespace
    from biformer_lit.cli import ConfigError, _named_checkpoint
    for version, files in ((0, ["last.ckpt"]), (2, ["last.ckpt", "best-3.ckpt"]), (10, []), (11, ["x"])):
        (tmp_path / "exp" / f"version_{version}" / "checkpoints").mkdir(parents=True)
        for f in files:
            (tmp_path / "exp" / f"version_{version}" / "checkpoints" / f).write_bytes(b"")

    def cfg(version=None):
        logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                           init_args=Namespace(save_dir=str(tmp_path), name="exp", version=version))
        return Namespace(trainer=Namespace(logger=logger), last_checkpoint=Namespace(dirpath=None))

    newest = str(tmp_path / "exp" / "version_2" / "checkpoints" / "last.ckpt")
    assert _named_checkpoint("validate", "last", cfg()) == newest
    assert _named_checkpoint("predict", "last", cfg(0)) == str(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt")
    assert _named_checkpoint("fit", "last", cfg()) is None  # fit's own resume (see _continue_logger_version)
    with pytest.raises(ConfigError, match=r"no checkpoints/last.ckpt under .*version_10"):
        _named_checkpoint("test", "last", cfg(10))
    with pytest.raises(ConfigError, match=r"pass the file, e.g. .*version_2/checkpoints/best-3.ckpt$"):
        _named_checkpoint("validate", "best", cfg())


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
    run = tmp_path / "runs" / "default" / "version_0"
    logged = scalars(run)
    (_, top1), = logged["val/top1"]
    (_, loss), = logged["val/loss"]

    from biformer_lit.data import ImageDataModule
    from biformer_lit.module import ClassificationModule
    model = ClassificationModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True).eval()
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


def _bad_cases(root: Path):
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
    folder = ["--data.dataset", "imagefolder", "--trainer.max_epochs", "1"]
    return {
        "missing_dataset": (["fit", *SMALL, *folder, "--data.root", str(root / "nowhere")], "does not exist"),
        "empty_class": (["fit", *SMALL, *folder, "--data.root", str(root / "empty")], "has no images"),
        "corrupt_image": (["fit", *SMALL, *folder, "--data.root", str(root / "corrupt"), "--data.batch_size", "2"],
                          "broken.png"),
        "class_count": (["fit", *SMALL, "--model.init_from", str(root / "ten_classes.pth")],
                        "10 classes but the model has 4"),
        "missing_ckpt": (["fit", *SMALL, "--ckpt_path", str(root / "gone.ckpt")], "gone.ckpt"),
        "corrupt_ckpt": (["fit", *SMALL, "--ckpt_path", str(root / "random.ckpt")],
                         "random.ckpt: not a readable PyTorch checkpoint"),
        "truncated_ckpt": (["validate", *SMALL, "--ckpt_path", str(root / "truncated.ckpt")],
                           "truncated.ckpt: not a readable PyTorch checkpoint"),
        "weights_as_ckpt": (["fit", *SMALL, "--ckpt_path", str(root / "ten_classes.pth")],
                            "is not a Lightning training checkpoint (no training state); for a file of weights "
                            "use --model.init_from"),
        "ckpt_other_classes": (["fit", *SMALL, "--ckpt_path", str(root / "ten_classes.ckpt")],
                               "does not fit this model (shape mismatch: model.head.bias (10,) vs (4,)"),
        "missing_init": (["validate", *SMALL, "--model.init_from", str(root / "gone.pth")], "gone.pth"),
        "unknown_key": (["fit", "--model.no_such_option", "1"], "no_such_option"),
        "wrong_type": (["fit", "--trainer.max_epochs", "ten"], "max_epochs"),
        "bad_topk": (["fit", *SMALL, "--model.model_kwargs", '{"topks": [99, 4, 2, 1]}'], "topk=99"),
        "kwargs_typo": (["fit", *SMALL, "--model.model_kwargs", '{"topk": 2}'],
                        "model_kwargs: BiFormer takes no 'topk' (did you mean 'topks'?); allowed: num_classes"),
        "option_typo": (["fit", "--model.lrr", "0.1"], "unrecognized arguments: --model.lrr 0.1 (did you mean "
                                                       "--model.lr?)"),
        "batch_too_big": (["fit", *SMALL, "--data.batch_size", "64"],
                          "batch_size=64 is larger than the 32 training images: no full batch"),
        "negative_lr": (["fit", *SMALL, "--model.lr", "-1"], "lr=-1.0; allowed: > 0"),
        "flex_on_cpu": (["fit", *SMALL, "--model.model_kwargs", '{"attn_backend": "flex"}'],
                        "attn_backend='flex' cannot train on the CPU"),
    }


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Runs every bad-input command once, concurrently (each is mostly Python start-up)."""
    root = tmp_path_factory.mktemp("bad")
    cases = _bad_cases(root)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(cli, args, root) for name, (args, _) in cases.items()}
        return {name: (f.result(), cases[name][1]) for name, f in futures.items()}


BAD = ["missing_dataset", "empty_class", "corrupt_image", "class_count", "missing_ckpt", "corrupt_ckpt",
       "truncated_ckpt", "weights_as_ckpt", "ckpt_other_classes", "missing_init", "unknown_key", "wrong_type",
       "bad_topk", "kwargs_typo", "option_typo", "batch_too_big", "negative_lr", "flex_on_cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_short_error(bad_runs, case):
    res, expected = bad_runs[case]
    assert res.returncode == 2, res.stderr[-2000:]
    assert expected in res.stderr
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()) <= 15, res.stderr  # the error, not pages of usage first


def test_a_full_disk_is_a_short_error(monkeypatch, tmp_path, capsys):
    """Writing last.ckpt fails with ENOSPC (the temp file goes to /dev/full): one `error:` line naming the
    file, exit 2, no traceback."""
    from test_module import write_to_full_disk
    monkeypatch.chdir(tmp_path)
    write_to_full_disk(monkeypatch)
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: cannot write \S*/checkpoints/\S*\.ckpt: No space left on device", err)
    assert "Traceback" not in err


def test_an_error_from_a_loader_worker_is_reported_by_its_own_message():
    from biformer_lit.cli import _message
    from biformer_lit.data import DataError
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    raise DataError(m)\n"
                        "biformer_lit.data.DataError: cannot read image a/bad.png: truncated\n")
    assert _message(wrapped) == "cannot read image a/bad.png: truncated"
    assert _message(DataError("plain message")) == "plain message"


def test_evaluating_a_checkpoint_on_other_data_settings_warns(tmp_path, capsys):
    """Lightning restores a checkpoint's model settings, not its data settings: say when they differ."""
    from biformer_lit.cli import _warn_other_data
    path = tmp_path / "run.ckpt"
    trained = {"img_size": 96, "num_classes": 4, "dataset": "synthetic"}
    _warn_other_data(str(path), trained, {"img_size": 64, "num_classes": None, "dataset": "synthetic"})
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {path} was trained with data.img_size=96 (now 64);") and "num_classes" not in err
    _warn_other_data(str(path), trained, {"img_size": 96, "num_classes": None, "dataset": "synthetic"})
    assert capsys.readouterr().err == ""


def test_top_level_help_names_every_command(tmp_path):
    out = cli(["--help"], tmp_path).stdout
    assert all(c in out for c in ("fit", "validate", "test", "predict", "cli.py report", "cli.py visualize"))


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_a_binary_config_file_is_a_short_error(tmp_path, capsys, command):
    """A checkpoint given as --config: fit's ablation hook and jsonargparse both let a UnicodeDecodeError
    escape with a traceback."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, path)
    try:
        code = main([command, "--config", str(path)])
    except SystemExit as e:  # jsonargparse's own error exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and f"error: config file {path} is not a text file (not UTF-8 text; allowed: a YAML file)" in err


@pytest.mark.parametrize("command,ckpt,message", [
    ("fit", "", "--ckpt_path is empty; allowed: a checkpoint file, or last"),  # e.g. --ckpt_path=$CKPT, CKPT unset
    ("fit", "{tmp}", "--ckpt_path {tmp} is a folder; allowed: a checkpoint file"),
    ("validate", "best", "--ckpt_path best: a new validate run does not know the best checkpoint"),
    ("fit", "hpc", "--ckpt_path hpc: no hpc_ckpt_*.ckpt in {tmp}"),
    ("validate", "last", "--ckpt_path last: no checkpoints/last.ckpt under"),
    ("predict", "last", "--ckpt_path last: no checkpoints/last.ckpt under"),
])
def test_ckpt_path_values_lightning_cannot_use_are_short_errors(monkeypatch, tmp_path, capsys, command, ckpt,
                                                                 message):
    """Each was a ValueError / IsADirectoryError traceback, or (validate/predict `last`: Lightning finds no
    last.ckpt in the new version folder) an evaluation of the untrained model with exit 0."""
    monkeypatch.chdir(tmp_path)
    assert main([command, *SMALL, f"--ckpt_path={ckpt.format(tmp=tmp_path)}"]) == 2
    err = capsys.readouterr().err
    assert "error: " + message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("predictions.csv"))


def test_validate_last_in_a_fixed_empty_checkpoint_folder_is_a_short_error(monkeypatch, tmp_path, capsys):
    """With --last_checkpoint.dirpath Lightning looks for last.ckpt there itself; none there: an error, not an
    evaluation of the untrained model."""
    monkeypatch.chdir(tmp_path)
    args = ["validate", *SMALL, f"--last_checkpoint.dirpath={tmp_path / 'ck'}", "--ckpt_path=last"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: --ckpt_path last: this validate run's checkpoint folder holds no last.ckpt" in err
    assert "Traceback" not in err


def test_a_seed_out_of_range_is_a_short_error(monkeypatch, tmp_path, capsys):
    """seed_everything raised a ValueError traceback; a data seed beyond torch's generators failed mid-run."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--seed_everything", "-5"]) == 2
    assert "error: seed_everything=-5; allowed: an integer in 0..4294967295" in capsys.readouterr().err
    assert main(["fit", *SMALL, "--data.seed", str(10**23)]) == 2
    assert f"error: seed={10**23}; allowed: an integer in 0..4294967295" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


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
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1", *where]) == 2
    assert (f"error: {last} holds an earlier run's last checkpoint, which this fit would overwrite: continue that "
            f"run with --ckpt_path last") in capsys.readouterr().err
    assert last.read_bytes() == b"an earlier run's checkpoint" and not list(last.parent.parent.glob("events.*"))


def test_slurm_variables_outside_a_job_step_are_a_short_error(monkeypatch, tmp_path, capsys):
    """SLURM_NTASKS=2 left in the environment (e.g. a shell of an allocation, without srun): Lightning's
    RuntimeError from Trainer() ended in a traceback."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the trainer cannot start: You set `--ntasks=2`") and "SLURM_NTASKS" in err
    assert "outside a SLURM job step, unset them" in err and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("flag,value,allowed", [
    ("accumulate_grad_batches", "0", "an integer >= 1"),  # ZeroDivisionError mid-run
    ("accumulate_grad_batches", "-1", "an integer >= 1"),  # a negative lr: AdamW's ValueError traceback
    ("val_check_interval", "0", "a fraction of the epoch in (0, 1], or a number of batches >= 1"),  # ZeroDivision
    ("gradient_clip_val", "-1.0", "a finite number >= 0 (0 or null: no clipping)"),  # clipping silently off
])
def test_trainer_settings_lightning_takes_unchecked_are_short_errors(monkeypatch, tmp_path, capsys, flag, value,
                                                                     allowed):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", *SMALL, "--trainer.max_epochs", "1", f"--trainer.{flag}", value]) == 2
    assert f"error: trainer.{flag}={value}; allowed: {allowed}" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_evaluating_without_weights_says_so(monkeypatch, tmp_path, capsys):
    """validate / test / predict with neither --ckpt_path nor --model.init_from evaluated random weights silently."""
    monkeypatch.chdir(tmp_path)
    assert main(["validate", *SMALL, "--trainer.limit_val_batches", "1"]) == 0
    assert ("warning: validate without --ckpt_path or --model.init_from: the untrained (randomly initialised) model "
            "is evaluated") in capsys.readouterr().err
