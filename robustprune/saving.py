"""Save and load pruned models safely: the weights in a safetensors file, the pruned structure as
JSON metadata beside them, and never pickle (loading a file runs no code from it).

Structured pruning changes the architecture, so a state dict alone does not fit a fresh instance.
The pruning functions record each step on the model (robustprune.pruning.record.record_step_):
blocks replaced by identities, attention heads removed, and Torch-Pruning's own history of the
channel groups removed with the input shape its graph was traced from. `load` replays these steps
on a fresh instance of the user's architecture, then loads the weights. Unstructured pruning only
zeroes weights and needs nothing more.

Metadata (safetensors metadata is str -> str): format ("robustprune"), format_version, model_class,
robustprune_version, torch_version, structure (JSON list of steps), aliases (JSON {name: stored
name} for tensors shared under several names), sha256 (of the tensors, to catch damaged data) and
user (the caller's JSON metadata)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from robustprune import __version__
from robustprune.errors import UserError, excerpt
from robustprune.files import atomic_write, check_regular_file
from robustprune.pruning.record import STRUCTURE_ATTR, record_step_

FORMAT = "robustprune"
FORMAT_VERSION = 1
STEP_KINDS = ("identity", "heads", "channels")
MAX_TRACE_ELEMENTS = 1 << 26  # a traced example input larger than this is a damaged shape, not a model's input

_OPTIONS = "the path given to robustprune.save"
_UNCHANGED = "any earlier file at that path is unchanged"
_FRESH = "pass a fresh instance of the architecture the file was saved from"
_DAMAGED = "the file is damaged or was edited: save the model again with robustprune.save or restore a complete copy"


# ---- the structure record ------------------------------------------------------------------------------


def structure_of(model: nn.Module) -> list:
    """The steps structured pruning applied to `model`, in order, as a copy of plain JSON data
    ([] for a model never pruned structurally)."""
    return json.loads(json.dumps(model.__dict__.get(STRUCTURE_ATTR, [])))


def apply_structure_(model: nn.Module, steps: list, *, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """Replay `steps` (from structure_of) on a fresh instance of the architecture they were taken
    from, so its shapes match the pruned model's; the weights are not touched. Returns the model."""
    _replay(model, steps, "the structure", type(model).__name__, example_inputs)
    return model


def _replay(model: nn.Module, steps, where: str, saved_from: str, example_inputs) -> None:
    """Apply each step, after checking it is well formed and names layers the model has. A step
    that still fails says which one; the model may then be partly pruned (build a new one)."""
    if not isinstance(steps, list):
        raise UserError(f"{where} holds a pruning structure that is not a list of steps; {_DAMAGED}")
    done = structure_of(model)
    if steps[: len(done)] != done:
        raise UserError(f"the {type(model).__name__} given to load {where} was already pruned differently; {_FRESH}")
    was_training = model.training
    try:
        for k, step in enumerate(steps[len(done) :], start=len(done) + 1):
            _check_step(step, k, where)
            _check_names(model, step, where, saved_from)
            try:
                _apply_step(model, step, example_inputs)
            except UserError:
                raise
            except Exception as e:  # data from a file met a model it does not fit: one sentence, not a traceback
                raise UserError(
                    f"pruning step {k} ({step['kind']}) of {where} does not fit {type(model).__name__} "
                    f"({_first_line(e)}); {_FRESH}{_from(model, saved_from)}"
                ) from None
            record_step_(model, json.loads(json.dumps(step)))
    finally:
        model.train(was_training)  # Torch-Pruning's tracing leaves the model in eval mode


def _check_step(step, k: int, where: str) -> None:
    """A step holds exactly the plain values its kind needs (anything else is a damaged file)."""
    if not isinstance(step, dict) or not isinstance(step.get("kind"), str):
        raise UserError(f"pruning step {k} of {where} is not a step ({excerpt(step)}); {_DAMAGED}")
    kind = step["kind"]
    if kind not in STEP_KINDS:
        raise UserError(
            f"pruning step {k} of {where} is of unknown kind '{excerpt(kind)}' (known: {', '.join(STEP_KINDS)}); "
            f"it was saved by another version of robustprune or is damaged: upgrade robustprune or save it again"
        )
    if kind == "identity":
        ok = _is_name(step.get("name"))
    elif kind == "heads":
        ok = _is_name(step.get("name")) and _int_list(step.get("heads"))
    else:
        shape, history = step.get("input_shape"), step.get("history")
        dtype = step.get("input_dtype")
        traced = (
            _int_list(shape, low=1)
            and 1 <= len(shape) <= 8
            and math.prod(shape) <= MAX_TRACE_ELEMENTS
            and isinstance(dtype, str)
            and isinstance(getattr(torch, dtype, None), torch.dtype)
        )
        ok = (
            (traced or (shape is None and dtype is None))  # (None: inputs other than one tensor, load asks for them)
            and isinstance(history, list)
            and all(
                isinstance(h, list) and len(h) == 3 and _is_name(h[0]) and isinstance(h[1], bool) and _int_list(h[2])
                for h in history
            )
        )
    if not ok:
        raise UserError(f"pruning step {k} of {where} is malformed ({excerpt(step)}); {_DAMAGED}")


def _is_name(value) -> bool:
    return isinstance(value, str) and value != ""


def _int_list(value, low: int = 0) -> bool:
    return isinstance(value, list) and all(type(v) is int and v >= low for v in value)


def _layer_names(step: dict) -> list[str]:
    if step["kind"] == "channels":
        return [h[0] for h in step["history"]]
    return [step["name"]]


def _check_names(model: nn.Module, step: dict, where: str, saved_from: str) -> None:
    modules = dict(model.named_modules())
    for name in _layer_names(step):
        if name not in modules:
            raise UserError(
                f"{where} names layer '{excerpt(name)}' which {type(model).__name__} does not have; "
                f"{_FRESH}{_from(model, saved_from)}"
            )


def _apply_step(model: nn.Module, step: dict, example_inputs) -> None:
    kind = step["kind"]
    if kind == "identity":
        from robustprune.pruning.blocks import replace_with_identity_

        replace_with_identity_(model, step["name"])
    elif kind == "heads":
        from robustprune.pruning.structured import prune_attention_heads_

        prune_attention_heads_(model.get_submodule(step["name"]), step["heads"])
    else:
        import torch_pruning as tp

        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        if example_inputs is None:
            if step["input_shape"] is None:  # pruned with inputs other than one tensor: only the caller has them
                raise UserError(
                    f"the model was pruned with example inputs other than one tensor; "
                    f"pass example_inputs=... as given to the pruning to load it into {type(model).__name__}"
                )
            example_inputs = torch.zeros(step["input_shape"], dtype=getattr(torch, step["input_dtype"]))
        with torch.enable_grad():  # Torch-Pruning traces through autograd (a caller may load under no_grad)
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs.to(device))
        for name, out, idxs in step["history"]:
            # Torch-Pruning indexes without checking: an index past the end would prune the wrong shape silently
            layer = model.get_submodule(name)
            n = graph.get_out_channels(layer) if out else graph.get_in_channels(layer)
            if n is None or len(set(idxs)) != len(idxs) or not all(i < n for i in idxs) or len(idxs) >= n:
                raise ValueError(f"it removes channels {excerpt(idxs, 40)} of layer '{name}', which has {n}")
            graph.load_pruning_history([[name, out, list(idxs)]])  # (a copy: the graph keeps it as its history)


# ---- the file ------------------------------------------------------------------------------------------


def save(model: nn.Module, path: str | Path, *, metadata: dict | None = None) -> Path:
    """Write the model's weights and pruned structure to a safetensors file (whole or absent, never
    half written); `metadata` is any JSON-serialisable dict kept beside them (read_metadata).
    Returns the path. A file that cannot be written raises UserError."""
    path = Path(path)
    steps = structure_of(model)
    odd = [s for s in steps if s.get("kind") not in STEP_KINDS]
    if odd:
        raise UserError(
            f"{type(model).__name__} was pruned by a structure robustprune cannot record "
            f"({excerpt(odd[0])}), so a fresh instance could not be rebuilt from {path}; "
            f"save its state_dict and rebuild the pruned model in code instead"
        )
    if metadata is None:
        metadata = {}
    try:
        if not isinstance(metadata, dict):
            raise TypeError
        user = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError):
        raise UserError(
            f"metadata for {path} must be a dict of JSON values (strings, finite numbers, booleans, None, "
            f"lists and dicts), not {excerpt(metadata)}"
        ) from None
    tensors, aliases = _flat_state(model)
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_class": type(model).__name__,
        "robustprune_version": __version__,
        "torch_version": torch.__version__,
        "structure": json.dumps(steps),
        "aliases": json.dumps(aliases),
        "sha256": _digest(tensors),
        "user": user,
    }
    data = safetensors.torch.save(tensors, metadata=meta)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a plain Python write keeps the errno of a failure (ENOSPC, EROFS)
            f.write(data)

    return atomic_write(path, write, _OPTIONS, _UNCHANGED)


def load(
    path: str | Path, model: nn.Module, *, example_inputs: torch.Tensor | None = None, strict: bool = True
) -> nn.Module:
    """Load a file written by `save` into `model`, a fresh instance of the architecture it was
    saved from: the pruned structure is replayed first, then the weights are loaded. Nothing in
    the file is unpickled or run. `example_inputs` replaces the zero input Torch-Pruning's graph
    is traced with (for models that need particular inputs); strict=False allows tensors missing
    on either side. Returns the model; a missing, damaged or mismatched file raises UserError."""
    path = Path(path)
    meta, tensors = _read(path)
    where = str(path)
    steps = _json(meta, "structure", where)
    aliases = _json(meta, "aliases", where)
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in tensors for v in aliases.values()):
        raise UserError(f"{where} has tensor aliases that name no stored tensor; {_DAMAGED}")
    _replay(model, steps, where, meta.get("model_class", "?"), example_inputs)
    state = {**tensors, **{name: tensors[kept] for name, kept in aliases.items()}}
    _load_state(model, state, where, strict, meta.get("model_class", "?"))
    return model


def read_metadata(path: str | Path) -> dict:
    """The `metadata` dict given to save (the file is checked as load checks it)."""
    meta, _ = _read(Path(path))
    user = _json(meta, "user", str(path))
    if not isinstance(user, dict):
        raise UserError(f"{path} has user metadata that is not a dict; {_DAMAGED}")
    return user


def _read(path: Path) -> tuple[dict, dict]:
    """The metadata and tensors of a robustprune file, refused in one sentence unless whole, ours,
    of a version this robustprune reads, and with the tensors it was written with."""
    check_regular_file(path, "model file", "give the path of a file written by robustprune.save")
    if not path.exists():
        raise UserError(f"model file {path} does not exist; check the path (robustprune.save writes it)")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except safetensors.SafetensorError as e:
        raise UserError(
            f"model file {path} is not a safetensors file, or is truncated or damaged ({_first_line(e)}); "
            f"save the model again with robustprune.save or restore a complete copy"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read model file {path} ({e.strerror or e}); check its permissions") from None
    if meta.get("format") != FORMAT:
        raise UserError(
            f"{path} is a safetensors file without robustprune's metadata (not written by robustprune.save); "
            f"load plain weights with safetensors.torch.load_file and model.load_state_dict"
        )
    version = meta.get("format_version", "")
    if not version.isdigit() or len(version) > 6:
        raise UserError(f"{path} has no valid format version ({excerpt(version)}); {_DAMAGED}")
    if int(version) > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer robustprune (file format {int(version)}, this version reads up to "
            f"{FORMAT_VERSION}); upgrade robustprune to load it"
        )
    if meta.get("sha256") != _digest(tensors):
        raise UserError(f"{path} holds tensors that differ from those it was saved with; {_DAMAGED}")
    return meta, tensors


def _json(meta: dict, key: str, where: str):
    try:
        return json.loads(meta[key])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where} has no valid '{key}' metadata (not JSON); {_DAMAGED}") from None


def _load_state(model: nn.Module, state: dict, where: str, strict: bool, saved_from: str) -> None:
    """load_state_dict, after naming the first tensor whose shape (or presence) does not fit."""
    own = model.state_dict()
    cls = type(model).__name__
    for name, t in state.items():
        if name in own and own[name].shape != t.shape:
            raise UserError(
                f"{where} holds tensor '{name}' of shape {tuple(t.shape)} but {cls} has {tuple(own[name].shape)} "
                f"after its pruning was replayed; {_FRESH} (same widths){_from(model, saved_from)}"
            )
    if strict:
        missing = [n for n in own if n not in state]
        extra = [n for n in state if n not in own]
        if missing or extra:
            what = (
                f"lacks tensor '{missing[0]}' that {cls} has"
                if missing
                else f"holds tensor '{extra[0]}' which {cls} does not have"
            )
            raise UserError(f"{where} {what}; {_FRESH}, or pass strict=False{_from(model, saved_from)}")
    model.load_state_dict(state, strict=strict)


def _flat_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as safetensors takes it: contiguous CPU tensors, none sharing memory. A tensor
    held under several names (tied weights) is stored once, the other names kept as aliases."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in model.state_dict().items():
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        t = t.to("cpu").contiguous()
        if storage in storages:
            t = t.clone()  # a part of memory another tensor shares: safetensors refuses shared memory
        storages.add(storage)
        tensors[name] = t
    return tensors, aliases


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes (safetensors itself checks no data)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _from(model: nn.Module, saved_from: str) -> str:
    return f" (the file was saved from {saved_from})" if saved_from != type(model).__name__ else ""


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
