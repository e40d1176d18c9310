"""The ablation runner: shipped YAMLs, arm selection, skip-finished / resume-interrupted, report."""
import fcntl
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
import yaml

from biformer_lit.ablation import AblationError, maybe_run_ablation

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


def test_three_ablations_ship():
    assert {p.stem for p in ABLATIONS} >= {"topk_ablation", "region_ablation", "attention_ablation"}


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_arm_builds(path, tmp_path, capsys):
    """Each arm's config is complete and valid: build model, data and trainer for every arm (no training)."""
    from biformer_lit.ablation import arm_config, load_config, plan
    from biformer_lit.cli import make_cli
    cfg = load_config([str(path)])
    p = plan(cfg.pop("ablation"))
    assert len(p["arms"]) >= 3
    for arm in p["arms"]:
        run_dir = tmp_path / p["name"] / arm["name"] / "seed_0"
        run_dir.mkdir(parents=True)
        arm_cfg = arm_config(cfg, arm, 0, run_dir, visualize=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(arm_cfg))
        built = make_cli(["--config", str(run_dir / "config.yaml")], run=False)
        x = __import__("torch").randn(2, 3, built.datamodule.img_size, built.datamodule.img_size)
        assert built.model(x).shape == (2, built.datamodule.num_classes)


@pytest.mark.slow
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_every_arm_runs_a_step(path, tmp_path):
    out = cli(["fit", "--config", str(path), "--ablation.runs_dir=runs", "--ablation.parallel=2", *TINY], tmp_path)
    name = yaml.safe_load(path.read_text())["ablation"]["name"]
    arms = [a["name"] for a in yaml.safe_load(path.read_text())["ablation"]["arms"]]
    for arm in arms:
        status = json.loads((tmp_path / "runs" / name / arm / "seed_0" / "arm.json").read_text())
        assert status["status"] == "finished", (arm, out.stdout[-2000:])


def write_ablation(tmp_path, keep_every_epoch: bool = False) -> Path:
    cfg = yaml.safe_load((REPO / "experiments" / "base.yaml").read_text())
    cfg.pop("trainer", None)
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
    assert maybe_run_ablation(["fit", "--config", str(path), "--ablation.only=k4", "--ablation.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "would run k4/seed_0" in out and "k1/" not in out
    assert maybe_run_ablation(["fit", "--config", str(path), "--ablation.index=2", "--ablation.seeds=[0,1]",
                               "--ablation.dry_run=true"]) == 0
    out = capsys.readouterr().out
    assert "would run win/seed_0" in out and "would run win/seed_1" in out and "k1" not in out
    with pytest.raises(AblationError, match=r"--ablation.only='k9': no such arm; arms: k1, k4, win"):
        maybe_run_ablation(["fit", "--config", str(path), "--ablation.only=k9"])
    with pytest.raises(AblationError, match=r"--ablation.index=3; allowed: an integer in 0..2 \(3 arms\)"):
        maybe_run_ablation(["fit", "--config", str(path), "--ablation.index=3"])
    assert maybe_run_ablation(["fit", "--config", str(REPO / "experiments" / "base.yaml")]) is None


@pytest.mark.parametrize("flag,match", [
    ("--ablation.index=", r"--ablation.index is empty \(is \$SLURM_ARRAY_TASK_ID set\?\)"),
    ("--ablation.only=", r"--ablation.only is empty"),
    ("--ablation.index=two", r"--ablation.index='two'; allowed: an integer in 0..2"),
    ("--ablation.parallel=abc", r"ablation.parallel='abc'; allowed: an integer >= 1"),
    ("--ablation.seeds=[0,1", r"--ablation.seeds='\[0,1' is not a valid value"),
    ("--ablation.seeds=[a]", r"ablation.seeds='a'; allowed: an integer >= 0"),
    # beyond seed_everything's range: each arm failed with a traceback
    ("--ablation.seeds=[0,4294967296]", r"ablation.seeds=4294967296; allowed: an integer in 0..4294967295"),
])
def test_bad_ablation_values_are_rejected(tmp_path, flag, match):
    path = write_ablation(tmp_path)
    with pytest.raises(AblationError, match=match):
        maybe_run_ablation(["fit", "--config", str(path), flag, "--ablation.dry_run=true"])


@pytest.mark.parametrize("flag,match", [
    ("--ablation.name=[a,b]", r"ablation.name=\['a', 'b'\]; allowed: a folder name \(no '/'\)"),
    ("--ablation.name=..", r"ablation.name='..'; allowed: a folder name"),
    ("--ablation.runs_dir=[a]", r"ablation.runs_dir=\['a'\]; allowed: a folder path"),
    ("--ablation.visualize=maybe", r"ablation.visualize='maybe'; allowed: true or false"),
    ("--ablation.dry_run=0.5", r"ablation.dry_run=0.5; allowed: true or false"),
    ("--ablation.seeds=[0,0]", r"ablation.seeds=\[0, 0\]; allowed: distinct integers >= 0"),
    ("--ablation.only=[]", r"--ablation.only=\[\]; allowed: an arm name or a non-empty list of them; arms: k1, k4"),
    ("--ablation.arms=[{name: x, overrides: 3}]", r"ablation.arms\[0\].overrides=3; allowed: a mapping of dotted"),
    ("--ablation.arms=[{name: x, overides: {model.lr: 1}}]",
     r"ablation.arms\[0\] \(x\): unknown key\(s\) \['overides'\]; allowed: name, overrides"),
    ("--ablation.arms=[x]", r"ablation.arms\[0\]='x'; allowed: \{name: ..., overrides"),
    ("--ablation.arms=[{name: [x]}]", r"ablation.arms\[0\].name=\['x'\]; allowed: a folder name"),
    # every arm resumed from that one file, with its model settings (LightningCLI restores them)
    ("--ckpt_path=runs/mini/k1/seed_0/checkpoints/last.ckpt",
     r"--ckpt_path runs/mini/k1/seed_0/checkpoints/last.ckpt: every arm would resume from that one file"),
])
def test_wrong_types_and_silent_mistakes_are_rejected(tmp_path, flag, match):
    """Each was a traceback, or taken silently (bool('maybe'), a misspelled arm key running the base config,
    one seed twice, no arm at all)."""
    path = write_ablation(tmp_path)
    with pytest.raises(AblationError, match=match):  # the flag last: it overrides the dry run too
        maybe_run_ablation(["fit", "--config", str(path), "--ablation.dry_run=true", flag])


def test_numbers_are_names(tmp_path, capsys, monkeypatch):
    """`name: 1` (YAML reads a number) and --ablation.runs_dir=2024 name folders, as text."""
    monkeypatch.chdir(tmp_path)
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.dry_run=true", "--ablation.runs_dir=2024", "--ablation.name=7",
            "--ablation.arms=[{name: 1, overrides: {model.lr: 0.01}}, {name: 2}]", "--ablation.only=2"]
    assert maybe_run_ablation(args) == 0
    assert f"would run 2/seed_0 -> {Path('2024', '7', '2', 'seed_0')}" in capsys.readouterr().out


def test_a_section_that_is_not_a_mapping_is_rejected(tmp_path):
    (tmp_path / "a.yaml").write_text("model: {lr: 0.1}\nablation: [k1, k4]\n")
    with pytest.raises(AblationError, match=r"the ablation section holds a list; allowed: a mapping"):
        maybe_run_ablation(["fit", "--config", str(tmp_path / "a.yaml"), "--ablation.dry_run=true"])


@pytest.mark.parametrize("text,match", [("model: [1, 2\n", "is not valid YAML"),
                                        ("- model\n- data\n", "holds a list; allowed: a mapping of sections")])
def test_bad_config_files_are_rejected(tmp_path, text, match):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(AblationError, match=match):
        maybe_run_ablation(["fit", "--config", str(tmp_path / "bad.yaml")])


@pytest.fixture
def fits(monkeypatch, tmp_path):
    """Each arm's `fit` process "finishes" at once with fits.code (0); fits.commands: those started;
    fits.claimed: whether each one's run folder was claimed (locked) while it ran. With
    fits.signal set, a process sends that signal to the runner (as SLURM would) and exits -signal once the
    runner has passed it on (fits.received)."""
    from biformer_lit import ablation
    monkeypatch.chdir(tmp_path)
    fake = SimpleNamespace(commands=[], code=0, signal=None, received=[], claimed=[])

    class Process:
        pid = 4321

        def __init__(self, cmd, **kwargs):
            fake.commands.append(cmd)
            fake.claimed.append(claimed(Path(cmd[cmd.index("--config") + 1]).parent))
            self.passed_on = threading.Event()

        def send_signal(self, signum):
            fake.received.append(signum)
            self.passed_on.set()

        def wait(self):
            if fake.signal is None:
                return fake.code
            os.kill(os.getpid(), fake.signal)
            return -fake.signal if self.passed_on.wait(timeout=30) else fake.code

    call = lambda cmd, **kw: fake.commands.append(cmd) or fake.code  # noqa: E731 (--help, --print_config)
    monkeypatch.setattr(ablation, "subprocess", SimpleNamespace(**dict(vars(subprocess), Popen=Process, call=call)))
    return fake


def test_a_run_from_other_settings_is_neither_skipped_nor_resumed(tmp_path, fits, capsys):
    """A finished shortened run (or the CPU config before the paper-scale one) in the same folder: refused,
    naming what differs; the same settings again: skipped."""
    path = write_ablation(tmp_path)
    short = ["fit", "--config", str(path), "--ablation.only=k1", "--trainer.max_epochs=1"]
    assert maybe_run_ablation(short) == 0
    assert maybe_run_ablation(short) == 0 and "skip finished k1/seed_0" in capsys.readouterr().out
    with pytest.raises(AblationError, match=r"runs/mini/k1/seed_0 holds a run with other settings \(flags: "
                                            r"\['--trainer.max_epochs=1'\] -> \[\]\): use another --ablation.runs_dir"):
        maybe_run_ablation(short[:-1])
    with pytest.raises(AblationError, match=r"config.model.lr: 0.001 -> 0.5"):
        maybe_run_ablation(short + ["--config", str(write_config(tmp_path, {"model": {"lr": 0.5}}))])


def test_a_flag_written_either_way_is_the_same_setting(tmp_path, fits, capsys):
    """`--key value` and `--key=value`: recorded alike, so the rerun is skipped, not refused as other settings;
    also against a folder recorded before flags were normalised."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.only=k1"]
    assert maybe_run_ablation(args + ["--trainer.max_epochs", "1", "--trainer.max_steps", "-1"]) == 0
    status = tmp_path / "runs" / "mini" / "k1" / "seed_0" / "arm.json"
    info = json.loads(status.read_text())
    assert info["settings"]["flags"] == ["--trainer.max_epochs=1", "--trainer.max_steps=-1"]
    assert "--trainer.max_epochs=1" in fits.commands[-1]
    capsys.readouterr()
    assert maybe_run_ablation(args + ["--trainer.max_epochs=1", "--trainer.max_steps=-1"]) == 0
    assert "skip finished k1/seed_0" in capsys.readouterr().out
    status.write_text(json.dumps(dict(info, settings=dict(info["settings"], flags=[
        "--trainer.max_epochs", "1", "--trainer.max_steps", "-1"]))))
    assert maybe_run_ablation(args + ["--trainer.max_epochs=1", "--trainer.max_steps=-1"]) == 0
    assert "skip finished k1/seed_0" in capsys.readouterr().out
    assert len(fits.commands) == 1


def test_ckpt_path_last_is_not_a_setting(tmp_path, fits, capsys):
    """--ckpt_path last is allowed through (each arm resumes its own last.ckpt, as the runner does anyway): adding
    or dropping it on a rerun is the same run, skipped when finished, not refused as a run with other settings."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.only=k1", "--trainer.max_epochs=1"]
    assert maybe_run_ablation(args + ["--ckpt_path", "last"]) == 0
    assert "--ckpt_path=last" in fits.commands[-1]
    capsys.readouterr()
    assert maybe_run_ablation(args) == 0
    assert "skip finished k1/seed_0" in capsys.readouterr().out
    assert maybe_run_ablation(args + ["--ckpt_path=last"]) == 0
    assert "skip finished k1/seed_0" in capsys.readouterr().out
    assert len(fits.commands) == 1


@pytest.mark.parametrize("flags,match", [
    (["--model.lrr", "1e-3"], r"^arm k1: unrecognized arguments: --model.lrr=1e-3 \(did you mean --model.lr\?\) "
                              r"\(no run started\)$"),
    (["--trainer.max_epochs=two"], r"^arm k1: Parser key \"trainer.max_epochs\":.*Given value: two"),
    (["--ablation.arms=[{name: a}, {name: b, overrides: {model.wd: 1}}]"],
     r"^arm b: Group 'model' does not accept option 'wd'"),
    # the parser passed these; each arm's run then failed at build time
    (["--ablation.arms=[{name: a, overrides: {model.model_kwargs.topk: [1, 1, 1, 1]}}]"],
     r"^arm a: model_kwargs: BiFormer takes no 'topk' \(did you mean 'topks'\?\).* \(no run started\)$"),
    (["--ablation.arms=[{name: a, overrides: {model.model_kwargs.topks: [99, 4, 2, 1]}}]"], r"^arm a: .*topk=99"),
    (["--model.lr=-1"], r"^arm k1: lr=-1.0; allowed: > 0 \(no run started\)$"),
    (["--trainer.accumulate_grad_batches=0"], r"^arm k1: trainer.accumulate_grad_batches=0; allowed: an integer"),
])
def test_a_bad_flag_or_override_is_found_before_any_run_starts(tmp_path, fits, flags, match):
    """It made every arm's `fit` fail (exit 2), and the failed folder then refused the corrected command."""
    path = write_ablation(tmp_path)
    with pytest.raises(AblationError, match=re.compile(match, re.S)):
        maybe_run_ablation(["fit", "--config", str(path), *flags])
    assert fits.commands == [] and not (tmp_path / "runs").exists()


def test_a_flag_that_replaces_what_an_arm_sets_is_refused(tmp_path, fits):
    """`--model.model_kwargs={depths: ...}` replaces the whole mapping, so every arm lost its own topks / attn
    and trained the same model under its own name, silently. A key set one by one merges: fine."""
    path = write_ablation(tmp_path)
    with pytest.raises(AblationError, match=re.escape(
            "arm k1: --model.model_kwargs={depths: [1,1,1,1]} replace(s) the arm's own model.model_kwargs.topks=[1, 1, "
            "1, 1] (it would be unset), so the arms would not differ there")):
        maybe_run_ablation(["fit", "--config", str(path), "--model.model_kwargs", "{depths: [1,1,1,1]}"])
    with pytest.raises(AblationError, match=r"arm k4: --model.model_kwargs.topks=\[1,1,1,1\] replace\(s\) the arm's own "
                                            r"model.model_kwargs.topks=\[4, 4, 2, 1\] \(it would be \[1, 1, 1, 1\]\)"):
        maybe_run_ablation(["fit", "--config", str(path), "--model.model_kwargs.topks=[1,1,1,1]"])
    assert fits.commands == [] and not (tmp_path / "runs").exists()
    assert maybe_run_ablation(["fit", "--config", str(path), "--model.model_kwargs.depths=[1,1,1,1]",
                               "--model.lr", "1e-3"]) == 0
    assert len(fits.commands) == 3


def test_class_help_flags_train_nothing(tmp_path, fits, capsys):
    """--trainer.strategy.help CLASS answers (exit 0) like --help: no arm may run it and be recorded finished."""
    path = write_ablation(tmp_path)
    assert maybe_run_ablation(["fit", "--config", str(path), "--trainer.strategy.help", "DDPStrategy"]) == 0
    assert fits.commands[0][-1] == "--trainer.strategy.help=DDPStrategy" and len(fits.commands) == 1
    assert not (tmp_path / "runs").exists()


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
        assert maybe_run_ablation(["fit", "--config", str(path), "--ablation.only=[k1,k4]"]) == 128 + signum
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
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]", f"--ablation.parallel={parallel}"]
    assert maybe_run_ablation(args) == 1
    assert re.search(r"error: 2 run\(s\) failed: k1/seed_0, k4/seed_0 " + where, capsys.readouterr().err)
    assert json.loads((tmp_path / "runs/mini/k1/seed_0/arm.json").read_text())["status"] == "failed (exit 3)"


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


def claimed(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock."""
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_run_is_claimed_while_it_runs_and_a_second_invocation_refused(tmp_path, fits):
    """Two invocations on one arm ran it into one folder at once; other arms (SLURM array tasks) may run."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path)]
    k1 = tmp_path / "runs" / "mini" / "k1" / "seed_0"
    k1.mkdir(parents=True)
    with open(k1 / ".lock", "a+") as other:  # another invocation is running k1
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 99 on node7")
        other.flush()
        with pytest.raises(AblationError, match=r"runs/mini/k1/seed_0 is being run by another invocation "
                                                r"\(pid 99 on node7\): wait for it to end, or select other arms"):
            maybe_run_ablation(args + ["--ablation.only=[k4,k1]"])
        assert fits.commands == []  # refused before any run started
        assert maybe_run_ablation(args + ["--ablation.index=1"]) == 0  # k4
    assert maybe_run_ablation(args + ["--ablation.only=k1"]) == 0  # the other invocation ended
    assert len(fits.commands) == 2 and fits.claimed == [True, True]
    assert not claimed(k1)  # released at the end


def test_a_file_system_without_flock_runs_unclaimed(tmp_path, fits, monkeypatch, capsys):
    from biformer_lit import ablation

    def unsupported(fd, op):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(ablation, "fcntl", SimpleNamespace(**dict(vars(fcntl), flock=unsupported)))
    assert maybe_run_ablation(["fit", "--config", str(write_ablation(tmp_path)), "--ablation.only=k1"]) == 0
    assert "warning: cannot lock runs/mini/k1/seed_0/.lock (Function not implemented)" in capsys.readouterr().err
    assert len(fits.commands) == 1


def test_a_run_of_other_settings_that_saved_no_checkpoint_is_replaced(tmp_path, fits, capsys):
    """A run that failed before its first checkpoint (say a bad model setting) refused the corrected
    command; one that saved a checkpoint is still refused."""
    path = write_ablation(tmp_path)
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]"]
    fits.code = 2  # the fake runs fail (a bad lr is now found before any run starts: another setting stands in)
    assert maybe_run_ablation(args + ["--model.lr=0.2"]) == 1
    runs = tmp_path / "runs" / "mini"
    (runs / "k1" / "seed_0" / "events.out.tfevents.1.host.1.0").write_text("the failed run's log")
    (runs / "k4" / "seed_0" / "checkpoints").mkdir()
    (runs / "k4" / "seed_0" / "checkpoints" / "last.ckpt").write_text("a checkpoint")
    fits.code = 0
    with pytest.raises(AblationError, match=r"runs/mini/k4/seed_0 holds a run with other settings"):
        maybe_run_ablation(args + ["--model.lr=0.1"])
    capsys.readouterr()
    assert maybe_run_ablation(args[:-1] + ["--ablation.only=k1", "--model.lr=0.1", "--ablation.dry_run=true"]) == 0
    assert "would replace k1/seed_0: a run with other settings that saved no checkpoint" in capsys.readouterr().out
    assert (runs / "k1" / "seed_0" / "events.out.tfevents.1.host.1.0").exists()  # a dry run changes nothing
    assert maybe_run_ablation(args[:-1] + ["--ablation.only=k1", "--model.lr=0.1"]) == 0
    assert "replacing k1/seed_0: a run with other settings" in capsys.readouterr().out
    assert sorted(p.name for p in (runs / "k1" / "seed_0").iterdir()) == [".lock", "arm.json", "config.yaml"]
    info = json.loads((runs / "k1" / "seed_0" / "arm.json").read_text())
    assert info["status"] == "finished" and info["settings"]["flags"] == ["--model.lr=0.1"]


def write_config(tmp_path, cfg: dict) -> Path:
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_and_print_config_train_nothing(tmp_path):
    """`fit` answers --help / --print_config for the arms' configs; no run starts, no status is written."""
    path = write_ablation(tmp_path)
    out = cli(["fit", "--config", str(path), "--ablation.only=[k1,k4]", "--print_config"], tmp_path).stdout
    assert "# [ablation] k1/seed_0" in out and "# [ablation] k4/seed_0" in out
    k1_cfg, k4_cfg = (yaml.safe_load(part) for part in out.split("# [ablation] k4/seed_0"))
    assert k1_cfg["model"]["model_kwargs"]["topks"] == [1, 1, 1, 1]
    assert k4_cfg["model"]["model_kwargs"]["topks"] == [4, 4, 2, 1]
    out = cli(["fit", "--config", str(path), "--help"], tmp_path).stdout
    assert out.count("# [ablation]") == 1 and "--trainer" in out
    assert not (tmp_path / "runs").exists()


def test_bad_selection_exits_cleanly(tmp_path):
    path = write_ablation(tmp_path)
    proc = cli(["fit", "--config", str(path), "--ablation.only=nope"], tmp_path, check=False)
    assert proc.returncode == 2 and "no such arm" in proc.stderr and "Traceback" not in proc.stderr


def val_steps(run_dir: Path, events_file: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / events_file))
    acc.Reload()
    return [e.step for e in acc.Scalars("val/top1")]


@pytest.mark.slow
def test_skip_finished_resume_interrupted_and_report(tmp_path):
    path = write_ablation(tmp_path, keep_every_epoch=True)
    args = ["fit", "--config", str(path), "--ablation.only=[k1,k4]", *TINY[1:], "--trainer.max_epochs=2"]
    cli(args, tmp_path)
    runs = tmp_path / "runs" / "mini"
    k1, k4 = runs / "k1" / "seed_0", runs / "k4" / "seed_0"
    assert json.loads((k1 / "arm.json").read_text())["status"] == "finished"
    from biformer_lit.report import load_runs, make_report, summarize
    fitted = load_runs(runs)[0]["scalars"]
    cli(["validate", "--config", str(k1 / "config.yaml"), "--ckpt_path", str(k1 / "checkpoints" / "best-1.ckpt"),
         *TINY[1:]], tmp_path)  # evaluating an arm logs into its folder: its report stays the fit's
    assert len(list(k1.glob("events.out.tfevents.*"))) == 2 and load_runs(runs)[0]["scalars"] == fitted
    events_before = sorted(p.name for p in k1.glob("events.out.tfevents.*"))
    k4_events = sorted(p.name for p in k4.glob("events.out.tfevents.*"))
    both_epochs = val_steps(k4, k4_events[0])
    assert len(both_epochs) == 2

    # k4 "was killed" after its first epoch: its status says running, last.ckpt is that epoch's checkpoint
    info = json.loads((k4 / "arm.json").read_text())
    (k4 / "arm.json").write_text(json.dumps(dict(info, status="running")))
    shutil.copy(k4 / "checkpoints" / "best-0.ckpt", k4 / "checkpoints" / "last.ckpt")
    out = cli(args, tmp_path).stdout
    assert "skip finished k1/seed_0" in out
    assert "start k4/seed_0 (resuming)" in out
    assert sorted(p.name for p in k1.glob("events.out.tfevents.*")) == events_before  # nothing recomputed
    ckpt = __import__("torch").load(k4 / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 4
    resumed = [f for f in sorted(p.name for p in k4.glob("events.out.tfevents.*")) if f not in k4_events]
    assert val_steps(k4, resumed[0]) == both_epochs[1:]  # only the second epoch: continued, not restarted

    for run in load_runs(runs):  # the logged best includes the last epoch's validation
        top1 = [v for _, v in run["scalars"]["val/top1"]]
        assert run["scalars"]["best/val_top1"][-1][1] == pytest.approx(max(top1)), run["arm"]
    rows = summarize(load_runs(runs))
    assert [r["arm"] for r in rows] == ["k1", "k4"]
    for r in rows:
        assert r["params_m"] > 0 and r["gflops"] > 0 and r["train_images_per_sec"] > 0 and r["top1_mean"] >= 0
    report = make_report(runs).read_text()
    assert "| k1 |" in report and "| k4 |" in report


def test_evaluating_an_arm_leaves_its_report_alone(tmp_path):
    """`cli.py validate --config <arm>/config.yaml` logs into the arm's folder, at step 0: that point joined
    the arm's curve (and moved its mean val top-1 over epochs)."""
    from torch.utils.tensorboard import SummaryWriter
    from biformer_lit.report import load_runs
    run = tmp_path / "mini" / "k1" / "seed_0"
    with SummaryWriter(run) as fit:
        for step, top1 in [(0, 1.0), (9, 20.0), (19, 30.0)]:
            fit.add_scalar("train/loss" if step == 0 else "val/top1", top1, step)
        fit.add_scalar("best/val_top1", 30.0, 0)  # RunStats: also at step 0
    with SummaryWriter(run) as validate:
        validate.add_scalar("val/top1", 90.0, 0)
        validate.add_scalar("epoch", 0.0, 0)
    (scalars,) = [r["scalars"] for r in load_runs(tmp_path / "mini")]
    assert scalars["val/top1"] == [(9, 20.0), (19, 30.0)] and scalars["best/val_top1"] == [(0, 30.0)]
    assert "epoch" not in scalars


@pytest.mark.parametrize("data", ["imagenet", "cifar100"])
@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_paper_scale_switch_keeps_every_arm_valid(path, data, tmp_path):
    """`--config experiments/data/<data>.yaml` after an ablation: BiFormer-STL at 224 for every arm."""
    import timm
    from biformer_lit.ablation import arm_config, load_config, plan
    cfg = load_config([str(path), str(REPO / "experiments" / "data" / f"{data}.yaml")])
    p = plan(cfg.pop("ablation"))
    assert cfg["model"]["model"] == "biformer_stl" and cfg["data"]["img_size"] == 224
    assert cfg["trainer"]["max_epochs"] == 300
    for arm in p["arms"]:
        model = arm_config(cfg, arm, 0, tmp_path / arm["name"] / "seed_0", True)["model"]
        net = timm.create_model(model["model"], img_size=224, **model.get("model_kwargs", {}))
        assert net.stage_cfg["depths"] == [2, 2, 6, 2] and net.stage_cfg["embed_dims"] == [96, 192, 384, 768]
    from biformer_lit.data import ImageDataModule
    assert ImageDataModule(**cfg["data"]).hparams.num_classes is None  # the dataset's own, not the CPU task's
