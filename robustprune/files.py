"""Files as every part of robustprune reads and writes them. A file is written to a temporary name
in its folder and renamed, so a full disk or a kill never leaves half of one, and any failure to
write becomes one sentence. A path that should hold data is checked to be a regular file before it
is opened, so a FIFO or a device is refused instead of blocking or reading forever."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Callable

from robustprune.errors import UserError

TMP_SUFFIX = ".tmp"
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
KEPT = "everything finished before is kept"
STORE_UNCHANGED = "the result store is not changed"  # (what report's writers say: they only read it)

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse a path that exists but is not a regular file (symbolic links are followed). A
    missing path passes: each caller has its own sentence for that."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    raise UserError(f"{what} {path} is {kind}, not a regular file; {fix}")


def tmp_name(path: Path) -> Path:
    # host and pid in the name: a later run can tell a dead writer's leftover from a live write
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or the RuntimeError torch.save raises when its stream stops (a full disk gives
    'unexpected pos ...' or 'PytorchStreamWriter failed writing file ...', with no errno)."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("unexpected pos", "PytorchStreamWriter", "file write failed", "inline_container")
    )


def write_failed(path: str | os.PathLike, e: BaseException, options: str, tail: str = KEPT) -> UserError:
    """One sentence for a file that cannot be written: full disk, read-only folder, no permission.
    options: the command-line options that choose the folder, e.g. '--out, --checkpoints'."""
    path = Path(path)
    if isinstance(e, OSError):
        why = e.strerror or str(e)
        full = e.errno in FULL
    elif "strerror:" in str(e):  # torch's "open file failed with strerror: Permission denied"
        why = str(e).rsplit("strerror:", 1)[1].strip()
        full = "space" in why or "quota" in why
    else:  # torch gives no reason ('unexpected pos ...'); a full disk is by far the usual one
        why = "the write stopped halfway, usually because the disk is full"
        full = True
    if full:
        fix = f"free some space in {path.parent} or choose another folder ({options})"
    else:
        fix = f"choose a writable folder ({options})"
    return UserError(f"cannot write {path} ({why}); {fix}; {tail}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], options: str, tail: str = KEPT) -> Path:
    """write(tmp) fills a temporary file beside `path`, which is then renamed to `path`: the file
    is whole or absent (a previous version stays until the rename). Write failures raise UserError."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_write_failure(e):
            raise
        raise write_failed(path, e, options, tail) from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:  # renamed, never created, or the folder is gone
            pass
    return path


def write_text(path: str | os.PathLike, text: str, options: str, tail: str = KEPT) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), options, tail)
