"""The ablation runner: shipped YAMLs, arm selection, skip-finished / resume-interrupted, claims, signals.

In-process through the CLI's entry function; the arms' `fit` processes are faked (`fits`) except in the
few end-to-end runs marked slow."""
import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from biformer_lit.ablation import run as ablation_run
from biformer_lit.cli import main

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = sorted((REPO / "experiments").glob("*_ablation.yaml"))
TINY = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--data.train_size=64", "--data.val_size=32", "--data.batch_size=16"]


def cli(args, cwd, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def refused(capsys, *args) -> str:
    """The command is one error (exit 2) and starts nothing; its stderr."""
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def jobs(monkeypatch):
    """The runs an invocation would start (run_jobs captured: nothing runs)."""
    captured = []
    monkeypatch.setattr("biformer_lit.ablation.run_jobs", lambda js, parallel, dry: captured.extend(js) or 0)
    return captured


def test_three_ablations_ship():
    assert {p.stem for p in ABLATIONS} >= {"topk_ablation", "region_ablation", "attention_ablation"}


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_arm_resolves_builds_and_trains_a_step(path, tmp_path, monkeypatch, jobs):
    """Each arm's config, resolved by fit's parser, is complete: its model takes a training step on its data."""
    from biformer_lit.data import ImageDataModule
    from biformer_lit.module import ClassificationModule
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path)]) == 0
    section = yaml.safe_load(path.read_text())["ablation"]
    assert [(j.arm["name"], j.seed) for j in jobs] == [(a["name"], s) for a in section["arms"] for s in section["seeds"]]
    assert len(section["arms"]) >= 3 and len(section["seeds"]) >= 3
    for job in jobs:
        assert job.config["seed_everything"] == job.seed
        assert job.config["trainer"]["logger"]["init_args"]["version"] == f"seed_{job.seed}"
    for job in (j for j in jobs if j.seed == section["seeds"][0]):  # the seeds differ only in their seed
        cfg = job.config
        data = ImageDataModule(**dict(cfg["data"], batch_size=4, train_size=8))
        model = ClassificationModule(**dict(cfg["model"], num_classes=data.num_classes, img_size=data.img_size))
        for key, value in job.arm["overrides"].items():  # the arm's own setting reached its model
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value
        x, y = next(iter(data.train_dataloader()))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in model.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("data", ["imagenet", "cifar100"])
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_paper_scale_switch_keeps_every_arm_valid(path, data, tmp_path, monkeypatch, jobs):
    """`--config experiments/data/<data>.yaml` after an ablation: BiFormer-STL at 224 for every arm."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path), "--config", str(REPO / "experiments" / "data" / f"{data}.yaml")]) == 0
    for job in jobs:
        cfg = job.config
        assert cfg["model"]["model"] == "biformer_stl" and cfg["data"]["img_size"] == 224
        assert cfg["trainer"]["max_epochs"] == 300 and cfg["data"].get("num_classes") is None


def write_ablation(tmp_path, keep_every_epoch: bool = False) -> Path:
    cfg = yaml.safe_load((REPO / "experiments" / "base.yaml").read_text())
    cfg["trainer"] = {"accelerator": "cpu", "devices": 1}
    if keep_every_epoch:  # checkpoints best-0.ckpt, best-1.ckpt, ...: a test rolls a run back to one
        cfg["checkpoint"] = {"monitor": None, "save_top_k": -1}
    cfg["ablation"] = {"name": "mini", "visualize": False, "arms": [
        {"name": "k1", "overrides": {"model.model_kwargs": {"topks": [1, 1, 1, 1]}}},
        {"name": "k4", "overrides": {"model.model_kwargs": {"topks": [4, 4, 2, 1]}}},
        {"name": "win", "overrides": {"model.model_kwargs": {"attn": ["window", "window", "window", "full"]}}}]}
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_selection_by_name_and_index(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_ablation(tmp_path)
    assert main(["fit", "--config", str(path), "--ablation.only=k4", "--ablation.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "would run k4/seed_0" in out and "k1/" not in out
    assert main(["fit", "--config", str(path), "--ablation.index=2", "--ablation.seeds=[0,1]",
                 "--ablation.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "would run win/seed_0" in out and "would run win/seed_1" in out and "k1" not in out
    assert "ablation.only='k9': no such arm; arms: k1, k4, win" in refused(capsys, "fit", "--config", str(path),
                                                                          "--ablation.only=k9")
    assert "ablation.index=3; allowed: an integer in 0..2 (3 arms)" in refused(capsys, "fit", "--config", str(path),
                                                                              "--ablation.index=3")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flag,named", [
    ("--ablation.seeds=[1,1]", "ablation.seeds=[1, 1]"),
    ("--ablation.seeds=[-1]", "ablation.seeds"),
    ("--ablation.seeds=[4294967296]", "ablation.seeds"),  # beyond seed_everything's range: every arm failed
    ("--ablation.seeds=[true]", "ablation.seeds"),
    ("--ablation.parallel=0", "ablation.parallel"),
    ("--ablation.visualize=maybe", "ablation.visualize"),
    ("--ablation.name=a/b", "ablation.name='a/b'"),
    ("--ablation.runs_dir=", "ablation.runs_dir"),
    ("--ablation.arms=[]", "no config has ablation arms"),
    ("--ablation.arms=[{name: a}, {name: a}]", "names ['a', 'a']"),
    ("--ablation.arms=[{name: a, overides: {model.lr: 0.1}}]", "Unexpected keys: {'overides'}"),  # ran the base
    ("--ablation.arms=[1]", "ablation.arms"),
    ("--ablation.only=[]", "ablation.only=[]"),
    ("--ablation.reference=nope", "ablation.reference='nope': no such arm"),
    ("--ablation.bogus=1", "--ablation.bogus"),
])
def test_bad_ablation_values_are_one_error(tmp_path, capsys, monkeypatch, flag, named):
    monkeypatch.chdir(tmp_path)
    assert named in refused(capsys, "fit", "--config", str(write_ablation(tmp_path)), flag)
    assert not (tmp_path / "runs").exists()


def test_numbers_are_names(tmp_path, capsys, monkeypatch):
    """YAML reads `name: 1` as a number: an arm or ablation name is a folder name all the same."""
    monkeypatch.chdir(tmp_path)
    path = write_ablation(tmp_path)
    assert main(["fit", "--config", str(path), "--ablation.name=7", "--ablation.arms=[{name: 1}, {name: 2}]",
                 "--ablation.only=2", "--ablation.dry_run=true"]) == 0
    assert "would run 2/seed_0 -> runs/7/2/seed_0" in capsys.readouterr().out


@pytest.fixture
def fits(monkeypatch, tmp_path):
    """Each arm's `fit` process "finishes" at once with fits.code (0); fits.commands: those started;
    fits.claimed: whether each one's run folder was claimed (locked) while it ran. With fits.signal set, a
    process sends that signal to the runner (as SLURM would) and exits -signal once the runner has passed it
    on (fits.received)."""
    monkeypatch.chdir(tmp_path)
    fake = SimpleNamespace(commands=[], code=0, signal=None, received=[], claimed=[], env=[])

    class Process:
        pid = 4321

        def __init__(self, cmd, **kwargs):
            fake.commands.append(cmd)
            fake.env.append(kwargs.get("env", {}))
            run_dir = Path(cmd[cmd.index("--config") + 1]).parent
            fake.claimed.append(claimed(run_dir))
            self.passed_on = threading.Event()
            label = f"{run_dir.parent.name}/{run_dir.name}"
            self.stdout = io.StringIO(f"[{label}] epoch 1/1  val top-1 50.0%\nLightning's own output\n")

        def send_signal(self, signum):
            fake.received.append(signum)
            self.passed_on.set()

        def wait(self):
            if fake.signal is None:
                return fake.code
            os.kill(os.getpid(), fake.signal)
            return -fake.signal if self.passed_on.wait(timeout=30) else fake.code

    monkeypatch.setattr(ablation_run, "subprocess", SimpleNamespace(**dict(vars(subprocess), Popen=Process)))
    return fake


def claimed(run_dir: Path) -> bool:
    """Whether another process (or open file) holds the run folder's lock."""
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_each_run_gets_its_resolved_config_and_its_claim(tmp_path, fits):
    """The arm's fit reads one file: the run's whole config, resolved once by fit's parser (flags included);
    the claim on its folder is handed to it."""
    path = write_ablation(tmp_path)
    assert main(["fit", "--config", str(path), "--ablation.only=k4", "--trainer.max_epochs", "3"]) == 0
    (cmd,) = fits.commands
    assert cmd[cmd.index("fit"):] == ["fit", "--config", "runs/mini/k4/seed_0/config.yaml"]
    cfg = yaml.safe_load((tmp_path / "runs/mini/k4/seed_0/config.yaml").read_text())
    assert cfg["trainer"]["max_epochs"] == 3 and cfg["model"]["model_kwargs"]["topks"] == [4, 4, 2, 1]
    assert cfg["ablation"]["arms"] == []  # the arm's own fit is a plain run
    info = json.loads((tmp_path / "runs/mini/k4/seed_0/arm.json").read_text())
    assert info["status"] == "finished" and info["settings"] == json.loads(json.dumps(cfg))
    assert fits.claimed == [True] and fits.env[0]["BIFORMER_LIT_CLAIM_FD"].isdigit()
    assert not claimed(tmp_path / "runs/mini/k4/seed_0")  # released at the end


def test_a_run_from_other_settings_is_neither_skipped_nor_resumed(tmp_path, fits, capsys):
    """A finished shortened run (or the CPU config before the paper-scale one) in the same folder: refused,
    naming what differs; the same settings again, written either way: skipped."""
    path = write_ablation(tmp_path)
    short = ["fit", "--config", str(path), "--ablation.only=k1", "--trainer.max_epochs=1"]
    assert main(short) == 0
    assert main(short[:-1] + ["--trainer.max_epochs", "1"]) == 0
    assert "skip finished k1/seed_0" in capsys.readouterr().out
    assert "runs/mini/k1/seed_0 holds a run with other settings (trainer.max_epochs: 1 -> 10)" in \
        refused(capsys, *short[:-1])
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"model": {"lr": 0.5}}))
    assert "model.lr: 0.001 -> 0.5" in refused(capsys, *short, "--config", str(extra))
    assert len(fits.commands) == 1


def test_ckpt_path_last_is_not_a_setting_and_a_file_is_refused(tmp_path, fits, capsys):
    """--ckpt_path last is allowed through (each arm resumes its own last.ckpt, as the runner does anyway); a
    file would make every arm resume from that one file (and take its model settings)."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.only=k1", "--trainer.max_epochs=1"]
    assert main(args + ["--ckpt_path", "last"]) == 0
    assert main(args) == 0 and main(args + ["--ckpt_path=last"]) == 0
    assert capsys.readouterr().out.count("skip finished k1/seed_0") == 2
    assert len(fits.commands) == 1 and not any("--ckpt_path" in c for c in fits.commands[0])
    assert "--ckpt_path x.ckpt: every arm would resume from that one file" in refused(capsys, *args, "--ckpt_path",
                                                                                     "x.ckpt")


@pytest.mark.parametrize("flags,named", [
    (["--model.lrr", "1e-3"], "--model.lrr 1e-3 (did you mean --model.lr?)"),
    (["--trainer.max_epochs=two"], "trainer.max_epochs"),
    (["--ablation.arms=[{name: a}, {name: b, overrides: {model.wd: 1}}]"], "arm b: "),
    # the parser passed these before; each arm's run then failed at build time
    (["--ablation.arms=[{name: a, overrides: {model.model_kwargs.topk: [1, 1, 1, 1]}}]"], "arm a: "),
    (["--ablation.arms=[{name: a, overrides: {model.model_kwargs.topks: [99, 4, 2, 1]}}]"], "topk=99"),
    (["--ablation.arms=[{name: a, overrides: {model.lr: -1}}]"], "model.lr"),
    (["--model.lr=-1"], "model.lr"),
    (["--trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0"),
])
def test_a_bad_flag_or_override_is_found_before_any_run_starts(tmp_path, fits, capsys, flags, named):
    """It made every arm's `fit` fail (exit 2), and the failed folder then refused the corrected command."""
    path = write_ablation(tmp_path)
    assert named in refused(capsys, "fit", "--config", str(path), *flags)
    assert fits.commands == [] and not (tmp_path / "runs").exists()


def test_a_flag_merges_with_what_the_arms_set_and_may_not_set_their_keys(tmp_path, fits, capsys):
    """`--model.model_kwargs={depths: ...}` replaced the whole mapping, so every arm lost its own topks / attn and
    trained the same model under its own name, silently: now it merges. A flag on a key an arm (or the runner)
    sets would lose to the arm: refused."""
    path = write_ablation(tmp_path)
    err = refused(capsys, "fit", "--config", str(path), "--model.model_kwargs.topks=[1,1,1,1]")
    assert "--model.model_kwargs.topks is set by arm k1" in err
    assert "--seed_everything is set by the ablation" in refused(capsys, "fit", "--config", str(path),
                                                                 "--seed_everything=3")
    assert fits.commands == [] and not (tmp_path / "runs").exists()
    assert main(["fit", "--config", str(path), "--model.model_kwargs", "{depths: [1,1,1,1]}", "--model.lr", "1e-3"]) == 0
    kwargs = {p.parent.parent.name: yaml.safe_load(p.read_text())["model"]["model_kwargs"]
              for p in (tmp_path / "runs" / "mini").glob("*/seed_0/config.yaml")}
    assert kwargs == {"k1": {"depths": [1, 1, 1, 1], "topks": [1, 1, 1, 1]},
                      "k4": {"depths": [1, 1, 1, 1], "topks": [4, 4, 2, 1]},
                      "win": {"depths": [1, 1, 1, 1], "attn": ["window", "window", "window", "full"]}}


@pytest.mark.parametrize("flag", ["--print_config", "--help", "--trainer.strategy.help=DDPStrategy"])
def test_inspecting_flags_train_nothing(tmp_path, fits, capsys, flag):
    """--help / --print_config / --<class>.help answer (exit 0) from the parser: no arm runs or is recorded."""
    path = write_ablation(tmp_path)
    assert main(["fit", "--config", str(path), flag]) == 0
    out = capsys.readouterr().out
    if flag == "--print_config":
        assert yaml.safe_load(out)["ablation"]["arms"][1]["name"] == "k4"
    assert fits.commands == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("signum,slurm,received", [(signal.SIGTERM, False, signal.SIGTERM),
                                                   (signal.SIGUSR1, True, signal.SIGUSR1),
                                                   (signal.SIGUSR1, False, signal.SIGTERM)])
def test_a_signal_to_the_runner_reaches_the_arm_and_no_further_run_starts(tmp_path, fits, signum, slurm, received,
                                                                          capsys, monkeypatch):
    """SLURM signals the runner (SIGTERM: preemption, time limit; SIGUSR1: --signal=SIGUSR1@120): the running
    arm gets it (SIGUSR1 as SIGTERM outside SLURM, where a run would die of it without a checkpoint), is
    recorded interrupted, and the runner exits 128 + signal."""
    for key in ("SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    if slurm:
        monkeypatch.setenv("SLURM_NTASKS", "1")
        monkeypatch.setenv("SLURM_JOB_NAME", "ablation")
    path = write_ablation(tmp_path)
    fits.signal = signum
    ignore = lambda *args: None  # noqa: E731 (were the signal not handled, it must not end pytest)
    previous = signal.signal(signum, ignore)
    try:
        assert main(["fit", "--config", str(path), "--ablation.only=[k1,k4]"]) == 128 + signum
        assert signal.getsignal(signum) is ignore  # the runner's handler is gone again
    finally:
        signal.signal(signum, previous)
    assert fits.received == [received] and len(fits.commands) == 1
    runs = tmp_path / "runs" / "mini"
    assert json.loads((runs / "k1" / "seed_0" / "arm.json").read_text())["status"] == "interrupted"
    assert not (runs / "k4" / "seed_0" / "arm.json").exists()
    assert f"stopped by {signum.name}" in capsys.readouterr().err


@pytest.mark.parametrize("parallel,where", [(1, r"\(see their output above\)"),
                                            (2, r"\(see their runs/mini/k1/seed_0/stdout.log, runs/mini/k4/")])
def test_a_failed_run_says_where_its_output_is(tmp_path, fits, capsys, parallel, where):
    """One at a time, an arm's output goes to the terminal (its stdout.log stayed empty, yet was named)."""
    path = write_ablation(tmp_path)
    fits.code = 3
    assert main(["fit", "--config", str(path), "--ablation.only=[k1,k4]", f"--ablation.parallel={parallel}"]) == 1
    assert re.search(r"error: 2 run\(s\) failed: k1/seed_0, k4/seed_0 " + where, capsys.readouterr().err)
    assert json.loads((tmp_path / "runs/mini/k1/seed_0/arm.json").read_text())["status"] == "failed (exit 3)"


def test_runs_at_once_log_to_their_folders_and_print_their_progress_lines(tmp_path, fits, capsys):
    path = write_ablation(tmp_path)
    assert main(["fit", "--config", str(path), "--ablation.only=[k1,k4]", "--ablation.parallel=2"]) == 0
    out = capsys.readouterr().out
    assert "[k1/seed_0] epoch 1/1" in out and "[k4/seed_0] epoch 1/1" in out and "Lightning's own" not in out
    log = (tmp_path / "runs/mini/k1/seed_0/stdout.log").read_text()
    assert "[k1/seed_0] epoch 1/1" in log and "Lightning's own output" in log


def test_a_run_is_claimed_while_it_runs_and_a_second_invocation_refused(tmp_path, fits, capsys):
    """Two invocations on one arm ran it into one folder at once; other arms (SLURM array tasks) may run."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path)]
    k1 = tmp_path / "runs" / "mini" / "k1" / "seed_0"
    k1.mkdir(parents=True)
    with open(k1 / ".lock", "a+") as other:  # another invocation is running k1
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 99 on node7")
        other.flush()
        err = refused(capsys, *args, "--ablation.only=[k4,k1]")
        assert "runs/mini/k1/seed_0 is in use by another process (pid 99 on node7)" in err
        assert fits.commands == []  # refused before any run started
        assert main(args + ["--ablation.index=1"]) == 0  # k4
    assert main(args + ["--ablation.only=k1"]) == 0  # the other invocation ended
    assert len(fits.commands) == 2 and fits.claimed == [True, True]
    assert not claimed(k1)


def test_a_file_system_without_flock_runs_unclaimed(tmp_path, fits, monkeypatch, capsys):
    from biformer_lit import runs

    def unsupported(fd, op):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(runs, "fcntl", SimpleNamespace(**dict(vars(fcntl), flock=unsupported)))
    assert main(["fit", "--config", str(write_ablation(tmp_path)), "--ablation.only=k1"]) == 0
    assert "warning: cannot lock runs/mini/k1/seed_0/.lock (Function not implemented)" in capsys.readouterr().err
    assert len(fits.commands) == 1


def test_a_run_of_other_settings_that_saved_no_checkpoint_is_replaced(tmp_path, fits, capsys):
    """A run that failed before its first checkpoint (say a bad model setting) refused the corrected
    command; one that saved a checkpoint is still refused."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]"]
    fits.code = 2
    assert main(args + ["--model.lr=0.2"]) == 1
    runs = tmp_path / "runs" / "mini"
    (runs / "k1" / "seed_0" / "events.out.tfevents.1.host.1.0").write_text("the failed run's log")
    (runs / "k4" / "seed_0" / "checkpoints").mkdir()
    (runs / "k4" / "seed_0" / "checkpoints" / "last.ckpt").write_text("a checkpoint")
    fits.code = 0
    assert "runs/mini/k4/seed_0 holds a run with other settings" in refused(capsys, *args, "--model.lr=0.1")
    assert main(args[:-1] + ["--ablation.only=k1", "--model.lr=0.1", "--ablation.dry_run=true"]) == 0
    assert "would replace k1/seed_0: a run with other settings that saved no checkpoint" in capsys.readouterr().out
    assert (runs / "k1" / "seed_0" / "events.out.tfevents.1.host.1.0").exists()  # a dry run changes nothing
    assert main(args[:-1] + ["--ablation.only=k1", "--model.lr=0.1"]) == 0
    assert "replacing k1/seed_0: a run with other settings" in capsys.readouterr().out
    assert sorted(p.name for p in (runs / "k1" / "seed_0").iterdir()) == [".lock", "arm.json", "config.yaml"]
    info = json.loads((runs / "k1" / "seed_0" / "arm.json").read_text())
    assert info["status"] == "finished" and info["settings"]["model"]["lr"] == 0.1


def val_steps(run_dir: Path, events_file: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / events_file))
    acc.Reload()
    return [e.step for e in acc.Scalars("val/top1")]


@pytest.mark.slow
def test_skip_finished_resume_interrupted_and_report(tmp_path, capsys, monkeypatch):
    """End to end, as a user runs it: two arms train, one is rolled back to an interrupted state; the rerun
    skips the finished arm and continues the other from its checkpoint; an evaluation of an arm keeps its
    report."""
    monkeypatch.chdir(tmp_path)  # the runner and validate in-process; the arms are their own processes
    path = write_ablation(tmp_path, keep_every_epoch=True)
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]", *TINY[1:], "--trainer.max_epochs=2"]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    runs = tmp_path / "runs" / "mini"
    k1, k4 = runs / "k1" / "seed_0", runs / "k4" / "seed_0"
    assert json.loads((k1 / "arm.json").read_text())["status"] == "finished"
    from biformer_lit.report import load_runs, summarize
    fitted = load_runs(runs)[0]["scalars"]
    assert main(["validate", "--config", str(k1 / "config.yaml"), "--ckpt_path", str(k1 / "checkpoints" / "best-1.ckpt"),
                 *TINY[1:]]) == 0  # an evaluation logs beside the arm's own logs: its report stays the fit's
    assert (k1 / "validate" / "config.yaml").exists() and load_runs(runs)[0]["scalars"] == fitted
    events_before = sorted(p.name for p in k1.glob("events.out.tfevents.*"))
    k4_events = sorted(p.name for p in k4.glob("events.out.tfevents.*"))
    both_epochs = val_steps(k4, k4_events[0])
    assert len(both_epochs) == 2

    # k4 "was killed" after its first epoch: its status says running, last.ckpt is that epoch's checkpoint
    info = json.loads((k4 / "arm.json").read_text())
    (k4 / "arm.json").write_text(json.dumps(dict(info, status="running")))
    shutil.copy(k4 / "checkpoints" / "best-0.ckpt", k4 / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skip finished k1/seed_0" in out
    assert "start k4/seed_0 (resuming)" in out
    assert sorted(p.name for p in k1.glob("events.out.tfevents.*")) == events_before  # nothing recomputed
    ckpt = torch.load(k4 / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    resumed = [f for f in sorted(p.name for p in k4.glob("events.out.tfevents.*")) if f not in k4_events]
    assert val_steps(k4, resumed[0]) == both_epochs[1:]  # only the second epoch: continued, not restarted
    rows = summarize(load_runs(runs))
    assert [r["arm"] for r in rows] == ["k1", "k4"]
    for r in rows:
        assert r["params_m"] > 0 and r["gmacs"] > 0 and r["top1_mean"] >= 0


@pytest.mark.slow
def test_sigterm_to_the_runner_checkpoints_the_running_arm(tmp_path):
    """The real thing: the runner used to exit at once and leave the arm's fit running, orphaned (no
    preemption checkpoint, status "running", a rerun started a second process on the arm)."""
    path = write_ablation(tmp_path)
    k1 = tmp_path / "runs" / "mini" / "k1" / "seed_0"
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]", *TINY[1:], "--trainer.max_epochs=1000"]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    with open(tmp_path / "out.txt", "w") as out:
        runner = subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=tmp_path, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    pid = None
    try:
        while not (k1 / "checkpoints" / "last.ckpt").exists() and runner.poll() is None:  # training: past epoch 0
            time.sleep(0.2)
        pid = json.loads((k1 / "arm.json").read_text()).get("pid")
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=300) == 143, (tmp_path / "out.txt").read_text()[-3000:]
    finally:
        runner.kill()
        if pid:  # the arm's process, should it have been left running
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)
    out = (tmp_path / "out.txt").read_text()
    assert "interrupted by SIGTERM: last.ckpt saved" in out  # the arm's fit: its preemption checkpoint
    assert json.loads((k1 / "arm.json").read_text())["status"] == "interrupted"
    assert "start k4" not in out and not (tmp_path / "runs" / "mini" / "k4" / "seed_0" / "arm.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
