"""Checkpoints are plain tensors and dicts, written to a temporary name then renamed (never
half-written) and read with torch.load(weights_only=True) (never runs code from the file)."""

from __future__ import annotations

import os
import pickle
import socket
import warnings
import zipfile
from pathlib import Path

import torch

from robustprune.errors import UserError
from robustprune.files import TMP_SUFFIX, atomic_write, check_regular_file


def save(obj, path: str | Path) -> None:
    """torch.save to a temporary name, then renamed: a full disk or a kill never leaves half a file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file, a failed write keeps its errno (ENOSPC, EACCES)
            torch.save(obj, f)

    atomic_write(path, write, "--out, --checkpoints")


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporary files of writers on this host that died mid-write (a killed run).
    Files of live processes and of other hosts sharing the folder are left alone."""
    host, removed = socket.gethostname(), 0
    if not folder.is_dir():
        return 0
    for tmp in folder.glob(f"*{TMP_SUFFIX}"):
        parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 2)
        if len(parts) != 3 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def load(path: str | Path, what: str = "checkpoint", fix: str = "delete it so it is recomputed, or replace it"):
    path = Path(path)
    check_regular_file(path, what, fix)  # a FIFO would block the open, a device be read forever
    try:
        with warnings.catch_warnings():  # a raw pickle makes torch warn before our sentence says what is wrong
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; check the path") from None
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{what} {path} holds objects other than tensors and plain values, so it was not "
            f"loaded ({_refused_global(e)}); only load files you trust, re-saved as state dicts"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{what} {path} is truncated or corrupt ({_first_line(e)}); {fix}") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _refused_global(e: Exception) -> str:
    """The line of torch's long message that names what the file asked to import."""
    lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
    return lines[0].rstrip(".") if lines else _first_line(e)


def load_weights(path: str | Path) -> dict:
    """A user's weights file: a state dict, or a dict holding one under 'state' or 'state_dict'
    (robustprune's own checkpoints, Lightning-style files)."""
    check_regular_file(path, "weights file", "give the path of a state dict saved with torch.save")
    obj = load(path, "weights file", "replace it with a complete copy")
    if isinstance(obj, dict):
        for key in ("state", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"weights file {path} holds no state dict (a dict of tensors, alone or under 'state'); "
            "save it with torch.save(model.state_dict(), path)"
        )
    return obj


def load_state_into(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state dict, refusing one that belongs to another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        first = first if len(first) <= 200 else first[:200] + " ..."
        raise UserError(
            f"{source} does not fit this model ({first}); it was made for another architecture or width"
        ) from None


def load_user_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """A user's weights into `model`: a .safetensors file written by rp.save (its pruned structure
    is rebuilt first) or a torch state dict. Returns the model (the same object)."""
    if str(path).endswith(".safetensors"):
        from robustprune.saving import load as load_safetensors

        return load_safetensors(path, model)
    load_state_into(model, load_weights(path), f"weights file {path}")
    return model
