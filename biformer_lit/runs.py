"""Run folders: which one `--ckpt_path last` means, and the claim that keeps two processes out of one.

A run folder is a TensorBoardLogger version folder, <save_dir>/<name>/version_N (an ablation arm pins its
version to seed_<n>), holding the event files, config.yaml, hparams.yaml and checkpoints/ (last.ckpt, the
resumable state, and best-*.ckpt). A process that trains into a run folder holds an exclusive flock on its
`.lock` file while it runs, so a second `fit` of the same run, or a second ablation invocation of the same
arm, is refused. A flock ends with the processes holding it: a killed run leaves no stale claim. The
ablation runner claims an arm's folder before it reads its status and hands the claim to the arm's `fit`
(an inherited file descriptor named in CLAIM_ENV).
"""
import contextlib
import fcntl
import os
import re
import socket
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from .errors import UserError

VERSION_DIR = re.compile(r"version_(\d+)")  # TensorBoardLogger's run folders
LOCK = ".lock"
CLAIM_ENV = "BIFORMER_LIT_CLAIM_FD"


def versions(log_folder) -> List[Tuple[int, str]]:
    """(N, <log_folder>/version_N) of every run of a logger (<save_dir>/<name>), newest first."""
    folder = os.fspath(log_folder)
    found = [(int(m.group(1)), os.path.join(folder, d)) for d in (os.listdir(folder) if os.path.isdir(folder) else [])
             if (m := VERSION_DIR.fullmatch(d))]
    return sorted(found, reverse=True)


def last_checkpoint(run) -> Optional[str]:
    """<run>/checkpoints/last.ckpt if it exists."""
    path = os.path.join(os.fspath(run), "checkpoints", "last.ckpt")
    return path if os.path.isfile(path) else None


def version_of(ckpt_path, log_folder) -> Optional[int]:
    """N when ckpt_path lies in <log_folder>/version_N/checkpoints/, else None."""
    checkpoints = os.path.dirname(os.path.abspath(ckpt_path))
    version = os.path.dirname(checkpoints)
    m = VERSION_DIR.fullmatch(os.path.basename(version))
    if m and os.path.basename(checkpoints) == "checkpoints" and \
            os.path.dirname(version) == os.path.abspath(log_folder):
        return int(m.group(1))
    return None


def _inherited(lock_path: Path) -> Optional[int]:
    """The descriptor of `lock_path` this process inherited with its claim (CLAIM_ENV), if any."""
    fd = os.environ.get(CLAIM_ENV, "")
    if not fd.isdigit():
        return None
    try:
        same = os.path.samestat(os.fstat(int(fd)), os.stat(lock_path))
    except OSError:
        return None
    return int(fd) if same else None


@contextlib.contextmanager
def claim(run_dir) -> Iterator[int]:
    """An exclusive claim on a run folder for the duration of the block; yields the lock's descriptor (to hand
    to a child process: pass_fds and CLAIM_ENV). A claim this process inherited is used as it is."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
    if lock_path.exists():
        fd = _inherited(lock_path)
        if fd is not None:
            yield fd
            return
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(f"{run_dir} is in use by another process ({f.read().strip() or 'unknown'}): wait for it "
                            "to end, or run elsewhere") from None
        except OSError as e:  # e.g. Lustre mounted without `flock`: run unclaimed rather than not at all
            print(f"warning: cannot lock {f.name} ({e.strerror}): a second process on this run would not be "
                  "refused", file=sys.stderr)
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        yield f.fileno()
