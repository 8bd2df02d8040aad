"""A user's own architecture in a study file: `model: {import: "my_pkg.nets:make_net", args: {...}}`.
The function (or class) is put in the model registry under "import:<path>", so every part of the
tool that builds models by name builds it too. It takes images in [0, 1] (normalisation, if any,
inside the model) and receives the study's args, plus num_classes, image_shape, mean and std when
its signature names them."""

from __future__ import annotations

import inspect

from torch import nn

from robustprune.data.user import import_object
from robustprune.errors import UserError
from robustprune.models.registry import MODELS

DATASET_ARGS = ("num_classes", "image_shape", "mean", "std")
PREFIX = "import:"


def registered_name(spec: str) -> str:
    return PREFIX + spec


def register_import(spec: str) -> str:
    """Register the builder an import path names (once) and return its registry name."""
    name = registered_name(spec)
    if name in MODELS:
        return name
    fn = import_object(spec, "model.import")
    if not callable(fn):
        what = type(fn).__name__
        raise UserError(f"model.import '{spec}' is a {what}; name a function or class that builds the model")
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it the args only
        accepted = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())

    def build(**kwargs) -> nn.Module:
        # the dataset's facts go to the builder only where it asks for them
        args = {k: v for k, v in kwargs.items() if k not in DATASET_ARGS or takes_all or k in accepted}
        model = fn(**args)
        if not isinstance(model, nn.Module):
            raise UserError(f"model.import '{spec}' returned a {type(model).__name__}, not a torch nn.Module")
        return model

    MODELS.register(name, f"the study's own model ({spec})")(build)
    return name
