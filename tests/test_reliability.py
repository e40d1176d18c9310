"""Faults injected into real runs: SIGKILL at a random point, SIGTERM, a diverging loss; what was lost."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RUN = ["fit", "--data.img_size", "64", "--data.batch_size", "8", "--data.train_size", "64", "--data.val_size", "32",
       "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
       "--trainer.deterministic", "true", "--trainer.max_epochs", "4", "--trainer.log_every_n_steps", "1",
       "--model.warmup_steps", "2", "--model.mixup", "0.8", "--model.cutmix", "1.0", "--model.drop_path", "0.1",
       "--model.ema_decay", "0.9", "--seed_everything", "7"]


def start(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_ckpt(cwd: Path) -> Path:
    found = sorted(cwd.glob("runs/default/version_*/checkpoints/last.ckpt"))
    return found[-1] if found else cwd / "missing"


def final_state(cwd: Path) -> dict:
    ckpt = torch.load(last_ckpt(cwd), weights_only=True)
    return {"step": ckpt["global_step"], "epoch": ckpt["epoch"], **ckpt["state_dict"]}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("clean")
    proc = start(RUN, cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return final_state(cwd)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [0.35, 0.7])
def test_sigkill_then_same_command_gives_identical_run(uninterrupted, tmp_path, kill_after):
    """Killed with SIGKILL once last.ckpt exists (at a point that varies), restarted with the same command
    + --ckpt_path last: the final weights, EMA weights and step are bit-identical to the clean run."""
    proc = start(RUN, tmp_path)
    deadline = time.time() + 300
    while not last_ckpt(tmp_path).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(kill_after * random.Random(int(kill_after * 100)).uniform(0.5, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = torch.load(last_ckpt(tmp_path), weights_only=True)  # loads: the write was atomic
    assert before["global_step"] < uninterrupted["step"], "killed too late to test anything"
    again = start(RUN + ["--ckpt_path", "last"], tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert same(final_state(tmp_path), uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_run_continues(uninterrupted, tmp_path):
    proc = start(RUN, tmp_path)
    ckpt = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last_ckpt(tmp_path).exists():
            ckpt = torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"]
            break
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    saved = torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"]
    assert ckpt is not None and saved > ckpt  # a fresh checkpoint at the batch SIGTERM arrived, not the epoch end
    again = start(RUN + ["--ckpt_path", "last"], tmp_path)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-2000:]
    assert final_state(tmp_path)["step"] == uninterrupted["step"]


def test_non_finite_loss_stops_with_step_and_batch():
    from biformer_lit.errors import UserError
    from biformer_lit.module import ClassificationModule
    m = ClassificationModule(model="biformer_cpu_tiny", num_classes=4, img_size=64, mixup=0, cutmix=0)
    x = torch.randn(2, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match=r"non-finite training loss \(nan\) at global step 0, epoch 0, batch 3"):
        m.training_step((x, torch.tensor([0, 1])), 3)


@pytest.mark.slow
def test_a_nan_on_one_ddp_process_stops_every_process_cleanly(tmp_path):
    """A non-finite loss on rank 1 only: both processes stop with the error (rank 0 used to die in the
    next collective with a gloo connection error and a traceback; with NCCL it would wait for the timeout)."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(f"""
import sys, lightning as L
sys.path.insert(0, {str(REPO)!r})
from biformer_lit.data import ImageDataModule
from biformer_lit.errors import UserError
from biformer_lit.module import ClassificationModule

class NanOnRank1(ClassificationModule):
    def training_step(self, batch, i):
        x, y = batch
        return super().training_step((x * float("nan") if self.global_rank == 1 and self.global_step == 1 else x, y), i)

L.seed_everything(0)
m = NanOnRank1(num_classes=4, img_size=64, warmup_epochs=0, mixup=0, cutmix=0, model_kwargs=dict(depths=[1, 1, 1, 1]))
trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
try:
    trainer.fit(m, ImageDataModule(batch_size=4, train_size=32, val_size=8))
except UserError as e:
    print(f"rank {{trainer.global_rank}} stopped: {{e}}", flush=True)
    sys.exit(2)
""")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2, res.stderr[-3000:]
    assert "rank 1 stopped: non-finite training loss (nan) at global step 1" in res.stdout
    assert "rank 0 stopped: non-finite training loss on another process at global step 1" in res.stdout, res.stdout


@pytest.mark.slow
def test_diverging_run_exits_cleanly_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr 1e6 blows the weights up within a few steps: a short `error:`, exit 2, last.ckpt from before."""
    proc = start(RUN + ["--model.lr", "1e6", "--model.warmup_steps", "0", "--trainer.max_epochs", "8"], tmp_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-2000:]
    assert "error: non-finite training loss" in err and "Traceback" not in err
    if last_ckpt(tmp_path).exists():  # diverged after an epoch end: that checkpoint is finite
        state = torch.load(last_ckpt(tmp_path), weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class _Validations(L.Callback):
    """Records every (epoch, step, val/top1, batches) of fit's validation; SIGTERMs the process at one
    validation batch when `term_at` = (epoch, batch) is given."""

    def __init__(self, seen: list, term_at=None):
        self.seen, self.term_at = seen, term_at

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and (trainer.current_epoch, batch_idx) == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            done = trainer.fit_loop.epoch_loop.val_loop.batch_progress.current.completed
            self.seen.append((trainer.current_epoch, trainer.global_step, float(trainer.callback_metrics["val/top1"]), done))


def test_sigterm_during_validation_resumes_into_that_validation(tmp_path, monkeypatch):
    """A pre-emption while fit validates: the resumed run validates that epoch again from its first batch
    (Lightning alone resumes such a checkpoint as validated, so the epoch's val/top1 and best-checkpoint
    candidate never existed)."""
    from biformer_lit.cli import main
    from biformer_lit.module import ClassificationModule
    run = ["fit", "--model.model", "biformer_cpu_tiny", "--data.img_size", "64", "--data.batch_size", "8",
           "--data.train_size", "32", "--data.val_size", "32", "--trainer.max_epochs", "2",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--seed_everything", "3"]
    original = ClassificationModule.configure_callbacks

    def fit(folder, extra_callback, *args):
        monkeypatch.chdir(folder)
        monkeypatch.setattr(ClassificationModule, "configure_callbacks", lambda m: original(m) + [extra_callback])
        return main(run + list(args))

    clean = []
    (tmp_path / "clean").mkdir(), (tmp_path / "cut").mkdir()
    assert fit(tmp_path / "clean", _Validations(clean)) == 0
    cut = []
    assert fit(tmp_path / "cut", _Validations(cut, term_at=(0, 1))) == 143
    assert cut == []  # stopped inside epoch 0's validation
    assert fit(tmp_path / "cut", _Validations(cut), "--ckpt_path", "last") == 0
    assert cut == clean and [e for e, *_ in cut] == [0, 1] and all(n == 4 for *_, n in cut)
    assert sorted(p.name for p in (tmp_path / "cut").glob("runs/default/version_0/checkpoints/*.ckpt")) == \
        sorted(p.name for p in (tmp_path / "clean").glob("runs/default/version_0/checkpoints/*.ckpt"))


SLURM_ENV = dict(SLURM_NTASKS="1", SLURM_JOB_NAME="biformer_t", SLURM_JOB_ID="4242", SLURM_PROCID="0",
                 SLURM_LOCALID="0", SLURM_NODEID="0")


def test_foreign_hpc_checkpoint_is_refused_under_slurm(tmp_path, monkeypatch, capsys):
    """Lightning resumes any hpc_ckpt_N.ckpt in the working directory when no --ckpt_path is given under
    SLURM, whichever run wrote it: a fresh run says so instead of silently continuing another one."""
    from biformer_lit.cli import main
    monkeypatch.chdir(tmp_path)
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"another run's state")
    assert main(["fit", "--model.model", "biformer_cpu_tiny", "--data.img_size", "64", "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: hpc_ckpt_1.ckpt in " in err and "would silently resume" in err and "Traceback" not in err


@pytest.mark.slow
def test_slurm_time_limit_signal_saves_requeues_and_leaves_no_hpc_file(uninterrupted, tmp_path):
    """SIGUSR1 (`#SBATCH --signal=SIGUSR1@120`): last.ckpt at the batch in flight, `scontrol requeue JOB`,
    exit 143, no hpc_ckpt file for a later run to pick up; the requeued command finishes the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore", PATH=f"{bin_dir}:{os.environ['PATH']}",
               **SLURM_ENV)
    cmd = [sys.executable, str(REPO / "cli.py"), *RUN, "--ckpt_path", "last"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not last_ckpt(tmp_path).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    epoch_end = torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"]
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert torch.load(last_ckpt(tmp_path), weights_only=True)["global_step"] > epoch_end
    assert not list(tmp_path.rglob("hpc_ckpt_*"))
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert final_state(tmp_path)["step"] == uninterrupted["step"]


class _BatchLog(L.Callback):
    def __init__(self, seen: list):
        self.seen = seen

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, batch[0].clone(), batch[1].tolist()))


@pytest.mark.slow
def test_resumed_run_with_workers_sees_the_same_augmented_batches(tmp_path, monkeypatch):
    """With loader worker processes and RandAugment + random erasing: the batches of a run resumed after
    epoch 0 equal the uninterrupted run's, epoch by epoch, and do not depend on the number of workers
    (the resumed run replayed epoch 0's order; the augmentation depended on the worker's RNG)."""
    from test_data import _image_folder
    from biformer_lit.cli import main
    from biformer_lit.module import ClassificationModule
    root = _image_folder(tmp_path, per_class=4)
    run = ["fit", "--model.model", "biformer_cpu_tiny", "--data.dataset", "imagefolder", "--data.root", str(root),
           "--data.img_size", "32", "--data.batch_size", "2", "--data.rand_augment", "rand-m9-mstd0.5-inc1",
           "--data.random_erasing", "0.5", "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--seed_everything", "1"]
    original = ClassificationModule.configure_callbacks

    def batches(folder, workers, *args):
        seen = []
        (tmp_path / folder).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / folder)
        monkeypatch.setattr(ClassificationModule, "configure_callbacks", lambda m: original(m) + [_BatchLog(seen)])
        assert main(run + ["--data.num_workers", str(workers), *args]) == 0
        return seen

    whole = batches("whole", 1, "--trainer.max_epochs", "2")
    cut = batches("cut", 1, "--trainer.max_epochs", "1") + batches("cut", 1, "--trainer.max_epochs", "2",
                                                                    "--ckpt_path", "last")
    no_workers = batches("none", 0, "--trainer.max_epochs", "2")
    assert [e for e, *_ in whole] == [0] * 4 + [1] * 4
    for a, b, c in zip(whole, cut, no_workers):
        assert a[0] == b[0] == c[0] and a[2] == b[2] == c[2]
        assert torch.equal(a[1], b[1]) and torch.equal(a[1], c[1])
    assert not torch.equal(whole[0][1], whole[4][1])  # epochs differ (the check can tell them apart)


def test_sigusr1_handler_under_slurm_is_restored_and_ignored_outside_fit(tmp_path, monkeypatch):
    """After a fit that fails (Lightning skips callbacks' teardown then) SIGUSR1 is the process's own again;
    in validate it is ignored (Lightning's auto-requeue would write an hpc_ckpt there)."""
    from types import SimpleNamespace
    from biformer_lit.reliability import PreemptionCheckpoint
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    before = signal.getsignal(signal.SIGUSR1)
    cb = PreemptionCheckpoint()
    cb.setup(None, None, "validate")
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    cb.teardown(None, None, "validate")
    cb.setup(None, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == cb._on_requeue_signal
    cb.on_exception(SimpleNamespace(state=SimpleNamespace(fn="fit")), None, ValueError("a failed fit"))
    assert signal.getsignal(signal.SIGUSR1) == before


def test_write_text_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    """Benchmark results and ablation status files: a write cut short leaves the previous content."""
    import builtins
    from biformer_lit.errors import write_text_atomic

    path = tmp_path / "results.json"
    write_text_atomic(path, '{"cases": 1}')
    assert path.read_text() == '{"cases": 1}'

    real_open = builtins.open

    class CutShort:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:5])  # half of it reaches the disk, then the process is "killed"
            raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "open", lambda *a, **k: CutShort(real_open(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"cases": 2, "more": "data"}')
    monkeypatch.undo()
    assert path.read_text() == '{"cases": 1}'
