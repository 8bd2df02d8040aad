"""robustprune: prune neural networks and measure what pruning does to their robustness.

    import robustprune as rp
    pruned = rp.prune(model, "structured", ratio=0.3, criterion="l1", example_inputs=x[:1])
    pruned = rp.finetune(pruned, (x_train, y_train), epochs=2)
    result = rp.evaluate(pruned, (x_test, y_test), attacks={"autoattack": {"eps": 8 / 255}})
    rp.save(pruned, "pruned.safetensors")
    again = rp.load("pruned.safetensors", model=MyNet())

The names are imported when first used, so `import robustprune` stays light (the CLI and worker
processes import only what they run)."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "prune": "robustprune.api",
    "finetune": "robustprune.api",
    "evaluate": "robustprune.api",
    "masks_of": "robustprune.api",
    "save": "robustprune.saving",
    "load": "robustprune.saving",
    "export_onnx": "robustprune.export",
    "latency": "robustprune.export",
    "HFClassifier": "robustprune.pruning.hf",
}
__all__ = [
    "prune",
    "finetune",
    "evaluate",
    "masks_of",
    "save",
    "load",
    "export_onnx",
    "latency",
    "HFClassifier",
    "__version__",
]

if TYPE_CHECKING:  # what a type checker and an IDE see
    from robustprune.api import evaluate, finetune, masks_of, prune
    from robustprune.export import export_onnx, latency
    from robustprune.pruning.hf import HFClassifier
    from robustprune.saving import load, save


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'robustprune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
