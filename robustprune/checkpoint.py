"""Checkpoints are plain tensors and dicts, written to a temporary name then renamed (never
half-written) and read with torch.load(weights_only=True) (never runs code from the file)."""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from robustprune.errors import UserError


def save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | Path):
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check the path") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"checkpoint {path} holds objects other than tensors and plain values, so it was not "
                        f"loaded ({_first_line(e)}); only load checkpoints you trust, re-saved as state dicts") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)}); delete it so it "
                        "is recomputed, or replace it") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def load_state_into(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state dict, refusing one that belongs to another architecture."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"checkpoint {source} does not fit this model ({first}); it was made for another "
                        "architecture or width") from None
