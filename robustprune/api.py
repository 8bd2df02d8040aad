"""The library face: prune, fine-tune and evaluate any classifier (an nn.Module mapping images in
[0, 1] to logits) with the methods, criteria, attacks and shifts that study files name.

    import robustprune as rp
    pruned = rp.prune(model, "structured", ratio=0.3, criterion="l1", example_inputs=x[:1])
    pruned = rp.finetune(pruned, (x_train, y_train), epochs=2)
    result = rp.evaluate(pruned, (x_test, y_test), attacks={"autoattack": {"eps": 8 / 255}})

Data is (images, labels) tensors, a torch Dataset or a DataLoader (robustprune.data.user). The
study runner is these calls repeated over a grid."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from robustprune.data.user import Data, as_tensors
from robustprune.errors import UserError

CRITERION_IMAGES = 512  # training images a data-driven criterion (taylor, hrank, mrpf, ...) sees
MASKS = "_robustprune_masks"  # the attribute an unstructured pruning leaves its masks in


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def masks_of(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The masks an unstructured pruning left on the model (fine-tuning keeps them applied)."""
    return getattr(model, MASKS, None)


def prune(
    model: nn.Module,
    method: str = "global_magnitude",
    ratio: float = 0.5,
    *,
    example_inputs: torch.Tensor | None = None,
    data: Data | None = None,
    rewind_to: dict[str, torch.Tensor] | None = None,
    inplace: bool = False,
    **params: Any,
) -> nn.Module:
    """A pruned copy of `model` (the model itself with inplace=True).

    method: any registered pruning method (`robustprune list`): global_magnitude, reverse_magnitude
    (unstructured: `ratio` of the conv and linear weights zeroed, masks kept for fine-tuning),
    structured / channel_l1 / mrpf (channels removed through the dependency graph: `ratio` of the
    channels of every coupled group; criterion="taylor", target="blocks", ... as in study files),
    lottery_ticket (one round: magnitude masks, the surviving weights rewound to `rewind_to`, a
    state dict saved before training). `example_inputs`: one batch of images, needed to trace a
    structured pruning (default: the first image of `data`). `data`: training images for
    data-driven criteria (the first 512 are used)."""
    from robustprune.pruning import PRUNING_METHODS

    cls = PRUNING_METHODS.get(method)
    pruner = cls()
    try:
        settings = pruner.Params(**params)
        pruner.validate(settings)
        pruner.validate_sparsity(settings, ratio)
    except UserError:
        raise
    except Exception as e:  # pydantic's ValidationError or a method's ValueError: one sentence
        raise UserError(f"pruning method '{method}' cannot take {params or 'its defaults'}: {_first_line(e)}") from None
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise UserError(f"ratio must be a number in [0, 1), not {ratio!r}")
    if method != "lottery_ticket" and getattr(settings, "rounds", 1) > 1:  # interleaves fine-tuning: a loop
        raise UserError(
            f"rounds={settings.rounds} alternates pruning and fine-tuning; call rp.prune (ratio per round) and "
            "rp.finetune in a loop of your own, or use a study file"
        )
    if method == "lottery_ticket" and rewind_to is None:
        raise UserError(
            "lottery_ticket rewinds the surviving weights to their values before training; pass rewind_to="
            "<the model's state_dict saved before training> (one round: repeat prune and finetune for more)"
        )
    batch = None
    if pruner.needs_data(settings):
        if data is None:
            raise UserError(f"pruning method '{method}' with {params or 'its defaults'} scores channels on training "
                            "images; pass data=(x, y)")  # fmt: skip
        x, y = as_tensors(data, "the pruning data", limit=CRITERION_IMAGES)
        batch = (_float(x).to(_device(model)), y.to(_device(model)))
    if example_inputs is None:
        if data is None:
            x0 = None
        else:
            x0 = batch[0][:1] if batch is not None else as_tensors(data, "the pruning data", limit=1)[0][:1]
        example_inputs = _float(x0) if x0 is not None else None
    target = model if inplace else copy.deepcopy(model)
    if example_inputs is None:
        if not _unstructured(pruner):
            raise UserError(f"pruning method '{method}' traces the model; pass example_inputs=<one batch of images>")
        example_inputs = torch.zeros(1)  # unused by unstructured methods
    example_inputs = _float(example_inputs).to(_device(target))
    was_training = target.training
    masks = pruner.prune(target, ratio, example_inputs, settings, batch)
    target.train(was_training)
    if method == "lottery_ticket":
        from robustprune.pruning.unstructured import rewind_

        rewind_(target, rewind_to, masks)
    if masks is not None:
        old = masks_of(model) if inplace else masks_of(target)
        if old:  # pruning a pruned model: the union of what is gone
            masks = {k: m.bool() & old[k].bool() if k in old else m.bool() for k, m in masks.items()}
        setattr(target, MASKS, {k: m.bool() for k, m in masks.items()})
    return target


def _unstructured(pruner) -> bool:
    from robustprune.pruning.methods import GlobalMagnitude, LotteryTicket

    return isinstance(pruner, (GlobalMagnitude, LotteryTicket))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _first_line(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):  # pydantic: the first error, where and what
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
        return f"{where}: {msg}" if where else msg
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def finetune(
    model: nn.Module,
    data: Data,
    epochs: int = 2,
    *,
    lr: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
    adversarial: dict | None = None,
    **settings: Any,
) -> nn.Module:
    """Fine-tune `model` in place on `data` and return it. The masks of an unstructured pruning
    stay applied (pruned weights stay zero). `adversarial`: adversarial fine-tuning as MRPF,
    e.g. {"attack": "pgd", "eps": 2/255, "ratio": 0.2}. Other settings are those of a study
    file's `finetune:` section (optimizer, schedule, weight_decay, augment, precision, ...);
    the defaults are SGD with a cosine schedule. Returns the model in eval mode."""
    from robustprune.train import AdversarialTraining, TrainConfig, train

    x, y = as_tensors(data, "the fine-tuning data")
    try:
        cfg = TrainConfig(
            **{"schedule": "cosine", "epochs": epochs, "lr": lr, "batch_size": batch_size, **settings},
            adversarial=AdversarialTraining(**adversarial) if adversarial else None,
        )
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"fine-tuning settings are not valid: {_first_line(e)}") from None
    device = _device(model)
    train(model, x.to(device), y.to(device), cfg, seed, masks=masks_of(model))
    return model.eval()


def _attack_entries(attacks: dict | None) -> dict:
    """{label: {"eps": e or [e, ...], "attack": registry name (default the label), "subset": n,
    other params}} -> the study file's evaluation.attacks entries."""
    out = {}
    for label, spec in (attacks or {}).items():
        spec = dict(spec if isinstance(spec, dict) else {"eps": spec})
        eps = spec.pop("eps", None)
        if eps is None:
            raise UserError(f"attack '{label}' needs its eps, e.g. {{'{label}': {{'eps': 8/255}}}}")
        entry = {"eps": list(eps) if isinstance(eps, (list, tuple)) else [eps]}
        for key in ("attack", "subset"):
            if key in spec:
                entry[key] = spec.pop(key)
        entry["params"] = spec
        out[label] = entry
    return out


def _shift_settings(shifts) -> dict:
    """["corruptions", "occlusion"] or {"corruptions": {"severities": [5]}, "occlusion": [8, 16]}."""
    if isinstance(shifts, str):
        shifts = [shifts]
    chosen = dict(shifts) if isinstance(shifts, dict) else {name: None for name in shifts or ()}
    out = {}
    for name, value in chosen.items():
        if name == "corruptions":
            out["corruptions"] = value or {}
        elif name == "occlusion":
            out["occlusion"] = list(value) if value else [8, 16]
        else:
            raise UserError(f"unknown shift '{name}'; the shifts are corruptions and occlusion")
    return out


class _Quiet:
    """Progress that shows nothing (the API returns numbers; the CLI draws its own progress)."""

    def stage(self, text: str, total: int) -> None: ...
    def advance(self, completed: int, info: str = "") -> None: ...


def evaluate(
    model: nn.Module,
    data: Data,
    *,
    attacks: dict | None = None,
    shifts: list | dict | str | None = None,
    attack_subset: int | None = 1000,
    shift_subset: int | None = None,
    batch_size: int = 500,
    masking_tolerance: float = 0.005,
    record: dict | None = None,
) -> dict[str, float]:
    """Accuracy of `model` on `data`, clean and under every attack and shift: a mapping metric name
    -> value (fractions), named as in a study's store: acc_clean, acc_adv:<label>@<eps>,
    acc_corruption..., acc_occlusion@<size>, and the gradient-masking checks (check:... = 1.0
    when a check passed). `attacks`: {label: {"eps": e, **params}} with any registered attack
    (`robustprune list`); AutoAttack is {"autoattack": {"eps": 8/255}}. Attacks run on the first
    `attack_subset` images (None: all), shifts on the first `shift_subset`. `record`, if given,
    receives the per-image results (for paired comparisons)."""
    from robustprune.attacks.corruptions import corrupt
    from robustprune.evaluation.config import EvaluationConfig
    from robustprune.evaluation.suite import evaluate_robustness, first
    from robustprune.train import accuracy

    x, y = as_tensors(data, "the evaluation data")
    try:
        ev = EvaluationConfig(
            attacks=_attack_entries(attacks),
            attack_subset=attack_subset,
            shift_subset=shift_subset,
            batch_size=batch_size,
            masking_tolerance=masking_tolerance,
            **_shift_settings(shifts),
        )
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"evaluation settings are not valid: {_first_line(e)}") from None
    device = _device(model)
    model.eval()
    x_dev, y_dev = x.to(device), y.to(device)

    def corrupted(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        c, xs = ev.corruptions, first(x, ev.shift_subset)
        if c.source == "cifar10c":  # the official files: they are CIFAR-10's test images, in order
            from robustprune.attacks.cifar10c import load_cifar10c

            parts = [load_cifar10c(c.cifar10c_dir, kind, s) for s in c.severities]
            images = torch.stack([first(xc, ev.shift_subset) for xc, _ in parts])
            return images.to(device), torch.stack([first(yc, ev.shift_subset) for _, yc in parts]).to(device)
        # uint8 images stay uint8, as the official CIFAR-10-C files (and a study's cached sets) are
        as_given = (lambda z: (z * 255).round_().to(torch.uint8)) if xs.dtype == torch.uint8 else (lambda z: z)
        images = torch.stack([as_given(corrupt(xs, kind, s, c.seed)) for s in c.severities])
        ys = first(y, ev.shift_subset)
        return images.to(device), ys.expand(len(c.severities), -1).to(device)

    out = {"acc_clean": accuracy(model, x_dev, y_dev, batch_size, record, "acc_clean")}
    out.update(evaluate_robustness(model, x_dev, y_dev, ev, _Quiet(), corrupted=corrupted, record=record))
    if not ev.attacks:  # nothing was attacked: no attacked images, no masking checks to count
        out = {k: v for k, v in out.items() if k not in ("images:attacks", "masking_violations")}
    return out
