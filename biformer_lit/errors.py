"""The one user-error type, and failures of the storage under a run.

UserError: bad input the user can fix (a setting, a file, a folder). Every layer raises it where the
value is defined; the command line catches it once and prints `error: <message>`, exit status 2, no
traceback. Storage failures (read-only or full disk, no permission) are the environment, not a bug:
reported the same way. Also small files written so that a kill during the write cannot leave half of one.
"""
import argparse
import errno
import os
from pathlib import Path
from typing import Optional


class UserError(ValueError):
    """Bad input: the message names the value and what is allowed. A ValueError, so code that catches
    ValueError (timm, jsonargparse, users of the models) keeps working."""


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_oserror(e: BaseException) -> Optional[OSError]:
    """The storage failure behind `e`: `e` itself or an error it was raised from (torch.save wraps the
    OSError of a full disk in a RuntimeError); None for anything else."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def storage_error(e: BaseException) -> Optional[str]:
    """A one-line message if `e` is a storage failure (see storage_oserror), else None."""
    found = storage_oserror(e)
    if found is None:
        return None
    if not found.filename:
        return str(found.strerror or found)
    verb = "cannot access" if found.errno in (errno.EACCES, errno.EPERM) else "cannot write"  # reading too
    return f"{verb} {found.filename}: {found.strerror}"


def write_text_atomic(path, text: str) -> None:
    """Status / result files: a kill during the write leaves the old file, never half a new one."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def folder_arg(text: str) -> Path:
    """argparse type of the folder arguments of the commands: an empty one (a quoted unset variable) is refused,
    since Path("") is the working folder, where they would read and write instead; so is a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; allowed: a folder path")
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; allowed: a folder")
    return Path(text)
