"""Recording runs and comparing their settings.

Each run folder holds arm.json: the ablation, arm, seed, status (running / finished / interrupted /
failed (exit N)) and settings, the run's whole resolved fit config. A rerun skips a finished run and
resumes an interrupted one only if its settings are the same; a folder holding a run with other settings
is refused, naming what differs, unless that run saved no checkpoint (nothing to lose: it is replaced).
"""
import json
import shutil
from pathlib import Path
from typing import List

from ..errors import UserError, write_text_atomic
from ..runs import LOCK
from .plan import changed_keys, lookup


def read_arm(run_dir: Path) -> dict:
    try:
        info = json.loads((run_dir / "arm.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_status(run_dir: Path, **info) -> None:
    write_text_atomic(run_dir / "arm.json", json.dumps(info, indent=1))


def normalised(settings: dict) -> dict:
    """As it reads back from arm.json (tuples become lists)."""
    return json.loads(json.dumps(settings, default=str))


def differences(old: dict, new: dict) -> List[str]:
    return [f"{k}: {lookup(old, k)!r} -> {lookup(new, k)!r}" for k in changed_keys(old, new)]


def replaceable(run_dir: Path, settings: dict) -> bool:
    """Whether a run folder's earlier run must be cleared first: True where it holds a run with other settings
    that saved no checkpoint; False where it is empty or holds these settings; UserError where it holds a run
    with other settings and a checkpoint."""
    info = read_arm(run_dir)
    recorded = info.get("settings")
    if recorded is None or recorded == normalised(settings):
        return False
    if info.get("status") != "finished" and not any((run_dir / "checkpoints").glob("*.ckpt")):
        return True
    diff = differences(recorded, normalised(settings))
    raise UserError(f"{run_dir} holds a run with other settings ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})"
                    f": use another --ablation.runs_dir, or delete that folder to run it again")


def clear(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.name != LOCK:  # the claimed lock file stays: a new one would be unclaimed
            shutil.rmtree(path) if path.is_dir() else path.unlink()
