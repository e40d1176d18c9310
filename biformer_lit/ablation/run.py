"""Running the arms: one `fit` process per (arm, seed), claimed, signalled and recorded.

Each run is `python -m biformer_lit.cli fit --config <run folder>/config.yaml` (plus `--ckpt_path` to resume),
so every Lightning strategy works inside an arm. The invocation's claim on the run folder (biformer_lit.runs)
is handed to that process. SIGTERM and SIGUSR1 to the runner (SLURM's preemption / time-limit signals) go on
to the running arms (SIGUSR1 as SIGTERM outside SLURM, where a run does not handle it); after a signal no
further run starts and the runner exits 128 + signal.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..callbacks.progress import PROGRESS_ENV
from ..runs import CLAIM_ENV
from .record import clear, read_arm, replaceable, write_status

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class Job:
    ablation: str
    arm: dict           # name, overrides, index
    seed: int
    run_dir: Path
    config: dict        # the run's resolved fit config (its settings)
    config_text: str    # the same as the YAML its fit reads
    reference: str      # the arm the report compares it with
    lock: Optional[int] = None  # the claim's file descriptor

    @property
    def label(self) -> str:
        return f"{self.arm['name']}/seed_{self.seed}"


class Children:
    """The arms' running `fit` processes. While entered (in the main thread, where signal handlers run; the
    arms wait in pool threads), SIGTERM and SIGUSR1 to the runner go on to them."""

    def __init__(self):
        self.lock = threading.RLock()  # re-entrant: a second signal may arrive while the first is passed on
        self.running = set()
        self.stopped_by = None  # the signal that stopped the ablation
        self._handlers = {}

    def __enter__(self):
        from lightning.fabric.plugins.environments import SLURMEnvironment
        # a run handles SIGUSR1 (save, requeue) only under SLURM; elsewhere it would just die of it
        self.usr1_as = signal.SIGUSR1 if SLURMEnvironment.detect() else signal.SIGTERM
        if threading.current_thread() is threading.main_thread():
            self._handlers = {s: signal.signal(s, self.stop) for s in FORWARDED}
        return self

    def __exit__(self, *exc):
        for s, handler in self._handlers.items():
            signal.signal(s, handler)

    def start(self, cmd: List[str], **kwargs) -> Optional[subprocess.Popen]:
        with self.lock:  # checked and started at once: a signal in between would miss the new process
            if self.stopped_by:
                return None
            proc = subprocess.Popen(cmd, **kwargs)
            self.running.add(proc)
            return proc

    def wait(self, proc: subprocess.Popen) -> int:
        code = proc.wait()
        with self.lock:
            self.running.discard(proc)
        return code

    def stop(self, signum: int, frame=None, forward: bool = True) -> None:
        self.stopped_by = signum
        with self.lock:
            for proc in self.running if forward else ():
                proc.send_signal(self.usr1_as if signum == signal.SIGUSR1 else signum)


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except Exception:  # no usable CUDA: CPU runs
        return 0


def _best_top1(run_dir: Path) -> str:
    from ..report import best_top1, load_runs
    found = [b for r in load_runs(run_dir) if (b := best_top1(r)) is not None]
    return f", best top-1 {found[0]:.2f}%" if found else ""


def run_one(job: Job, parallel: int, slot: int, children: Children, schedule: dict) -> Optional[int]:
    """One arm's run: its exit status, None when the ablation was stopped before it started. schedule: the
    ablation's start time and the runs still to start (for the arms' progress lines)."""
    run_dir = job.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    info = dict(ablation=job.ablation, arm=job.arm["name"], index=job.arm["index"], seed=job.seed,
                reference=job.reference, overrides=job.arm["overrides"], settings=job.config)
    (run_dir / "config.yaml").write_text(job.config_text)
    cmd = [sys.executable, "-m", "biformer_lit.cli", "fit", "--config", str(run_dir / "config.yaml")]
    last = run_dir / "checkpoints" / "last.ckpt"
    resuming = last.is_file()
    if resuming:
        cmd.append(f"--ckpt_path={last}")  # interrupted earlier: continue, don't restart
    env = dict(os.environ, **{CLAIM_ENV: str(job.lock)}) if job.lock is not None else dict(os.environ)
    with schedule["lock"]:
        schedule["left"] -= 1
        env[PROGRESS_ENV] = json.dumps(dict(label=job.label, runs_after=schedule["left"], parallel=parallel,
                                            started=schedule["started"]))
    gpus = _cuda_count() if parallel > 1 else 0
    if gpus and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:  # runs at once share the cores, not oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    # runs at once would interleave on the terminal: each writes its stdout.log, and only its progress lines
    # (whole lines, labelled) reach the terminal
    logged = parallel > 1
    t0 = time.time()
    with open(run_dir / "stdout.log", "a") if logged else contextlib.nullcontext() as log:
        proc = children.start(cmd, env=env, stdout=subprocess.PIPE if logged else None, text=True,
                              stderr=subprocess.STDOUT if logged else None,
                              pass_fds=[job.lock] if job.lock is not None else [])
        if proc is None:
            return None
        if job.lock is not None:  # the claim's holder, should the runner be killed while the arm runs
            os.write(job.lock, f", its fit: pid {proc.pid}".encode())
        write_status(run_dir, **info, status="running", resumed=resuming, pid=proc.pid)
        print(f"[ablation] start {job.label}{' (resuming)' if resuming else ''}", flush=True)
        if logged:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(f"[{job.label}] "):
                    print(line, end="", flush=True)
        code = children.wait(proc)
    status = "finished" if code == 0 else "interrupted" if children.stopped_by else f"failed (exit {code})"
    write_status(run_dir, **info, status=status, seconds=round(time.time() - t0, 1))
    best = _best_top1(run_dir) if code == 0 else ""
    print(f"[ablation] {status}: {job.label} in {time.time() - t0:.0f}s{best}", flush=True)
    return code


def run_jobs(jobs: List[Job], parallel: int, dry_run: bool) -> int:
    """Skip the finished runs, run the others; the exit status."""
    replaced = [j for j in jobs if replaceable(j.run_dir, j.config)]
    for j in replaced:
        print(f"[ablation] {'would replace' if dry_run else 'replacing'} {j.label}: a run with other settings that "
              "saved no checkpoint", flush=True)
        if not dry_run:
            clear(j.run_dir)
    todo = [j for j in jobs if read_arm(j.run_dir).get("status") != "finished"]
    for j in jobs:
        if j not in todo:
            print(f"[ablation] skip finished {j.label}", flush=True)
    print(f"[ablation] {jobs[0].ablation}: {len(jobs)} run(s), {len(todo)} to do, {parallel} at a time", flush=True)
    if dry_run:
        for j in todo:
            print(f"[ablation] would run {j.label} -> {j.run_dir}")
        return 0
    schedule = dict(lock=threading.Lock(), left=len(todo), started=time.time())
    with Children() as children, ThreadPoolExecutor(max_workers=parallel) as pool:
        try:
            codes = list(pool.map(lambda ij: run_one(ij[1], parallel, ij[0], children, schedule), enumerate(todo)))
        except KeyboardInterrupt:  # Ctrl-C reached the arms too (one process group): start no further run
            children.stop(signal.SIGINT, forward=False)
    if children.stopped_by:
        print(f"[ablation] stopped by {signal.Signals(children.stopped_by).name}: running arms interrupted, no "
              "further run started; run the same command to continue", file=sys.stderr, flush=True)
        return 128 + children.stopped_by
    failed = [j for j, code in zip(todo, codes) if code]
    if failed:
        where = ", ".join(str(j.run_dir / "stdout.log") for j in failed) if parallel > 1 else "output above"
        print(f"error: {len(failed)} run(s) failed: {', '.join(j.label for j in failed)} (see their {where})",
              file=sys.stderr)
        return 1
    return 0
