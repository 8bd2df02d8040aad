"""`robustprune prune` and `robustprune evaluate`: one model, no study file. The model is a
registered name (resnet20) or an import path (my_pkg.nets:make_net) with its weights; the data a
registered dataset, an .npz file, an image folder or an import path. Both print the metrics a
study cell stores, through the same public calls (robustprune.api)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robustprune.errors import UserError, excerpt


def _values(items: list[str], option: str) -> dict:
    """KEY=VALUE words, VALUE read as YAML (3, 0.5, true, [1, 2] keep their types)."""
    from robustprune.study.schema import parse_set

    try:
        return parse_set(items)
    except UserError as e:
        raise UserError(str(e).replace("--set", option)) from None


def _attacks(specs: list[str]) -> dict:
    """--attack LABEL:KEY=VALUE,KEY=VALUE (e.g. pgd:eps=0.1,steps=20; autoattack:eps=0.0313725)."""
    out = {}
    for spec in specs:
        label, _, rest = spec.partition(":")
        if not label or label in out:
            raise UserError(f"--attack '{excerpt(spec)}' needs a new label; write e.g. --attack pgd:eps=0.1,steps=20")
        out[label] = _values([p for p in rest.split(",") if p], f"--attack {label}")
    return out


def load_data(spec: str, data_dir: str | None):
    """A registered dataset name, an .npz file, an image folder or an import path -> ImageDataset."""
    from robustprune.data import DATASETS, load_dataset
    from robustprune.data.user import register_source

    if spec in DATASETS:
        return load_dataset(spec, data_dir)
    if ":" in spec and not Path(spec).exists():
        return load_dataset(register_source("import", spec), data_dir)
    path = Path(spec)
    if path.is_dir():
        return load_dataset(register_source("folder", spec), data_dir)
    if path.suffix == ".npz" or path.is_file():
        return load_dataset(register_source("npz", spec), data_dir)
    known = ", ".join(DATASETS.names())
    raise UserError(
        f"--data '{excerpt(spec)}' is neither a dataset ({known}), an .npz file, an image folder nor an import "
        "path (package.module:function); check the name or path"
    )


def load_model(args, data):
    """The model --model names, built for the data's classes and image shape, with --weights."""
    from robustprune import checkpoint
    from robustprune.models import MODELS, build_model, check_model
    from robustprune.models.user import register_import

    name = register_import(args.model) if ":" in args.model else args.model
    MODELS.get(name)
    kwargs = _values(args.arg, "--arg")
    facts = dict(num_classes=data.num_classes, image_shape=data.image_shape, mean=data.mean, std=data.std)
    check_model(name, kwargs, dataset=data.name, **facts)
    model = build_model(name, **facts, **kwargs)
    if args.weights:
        if args.weights.endswith(".safetensors"):
            from robustprune.saving import load

            model = load(args.weights, model)
        else:
            state = checkpoint.load_weights(args.weights)
            checkpoint.load_state_into(model, state, f"weights file {args.weights}")
    return model.eval()


def _evaluate_kwargs(args) -> dict:
    shifts = {}
    if args.corruptions:
        shifts["corruptions"] = {"severities": args.corruptions}
    if args.occlusion:
        shifts["occlusion"] = args.occlusion
    return dict(
        attacks=_attacks(args.attack),
        shifts=shifts,
        attack_subset=args.attack_subset,
        shift_subset=args.shift_subset,
    )


def _size(model) -> dict[str, float]:
    from robustprune.metrics.size import count_params

    total, nonzero = count_params(model)
    return {"parameters": float(total), "nonzero parameters": float(nonzero)}


def _print(console, title: str, columns: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    console.print(title, highlight=False)
    t = Table()
    t.add_column("Metric")
    for name in columns:
        t.add_column(name, justify="right")
    first = next(iter(columns.values()))
    for metric in first:
        cells = []
        for values in columns.values():
            v = values.get(metric)
            is_share = metric.startswith(("acc_", "check:")) or metric in ("masking_violations",)
            cells.append("—" if v is None else f"{100 * v:.2f}" if is_share and metric.startswith("acc_") else f"{v:g}")
        t.add_row(metric, *cells)
    console.print(t)
    console.print("acc_* in %; every metric as a study stores it (docs/api.md: names).", highlight=False)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        from robustprune.files import write_text

        write_text(path, json.dumps(payload, indent=2), "--json")


def cmd_evaluate(args, console) -> int:
    from robustprune.api import evaluate

    data = load_data(args.data, args.data_dir)
    model = load_model(args, data)
    x, y = data.x_test[: args.test_subset], data.y_test[: args.test_subset]
    result = _size(model) | evaluate(model, (x, y), **_evaluate_kwargs(args))
    _print(console, f"{args.model} on {data.name}: {len(x)} test images", {"model": result})
    _write_json(args.json, {"model": args.model, "data": args.data, "metrics": result})
    return 0


def cmd_prune(args, console) -> int:
    from robustprune.api import evaluate, finetune, prune

    data = load_data(args.data, args.data_dir)
    model = load_model(args, data)
    train = (data.x_train, data.y_train)
    params = _values(args.param, "--param")
    pruned = prune(model, args.method, args.ratio, example_inputs=data.x_train[:1], data=train, **params)
    if args.finetune_epochs:
        finetune(pruned, train, args.finetune_epochs, lr=args.lr, seed=args.seed)
    if args.save:
        from robustprune.saving import save

        save(pruned, args.save, metadata={"method": args.method, "ratio": args.ratio, "params": params})
    x, y = data.x_test[: args.test_subset], data.y_test[: args.test_subset]
    kwargs = _evaluate_kwargs(args)
    dense, small = _size(model) | evaluate(model, (x, y), **kwargs), _size(pruned) | evaluate(pruned, (x, y), **kwargs)
    title = f"{args.model} on {data.name}: {args.method} at ratio {args.ratio:g}" + (
        f", fine-tuned {args.finetune_epochs} epochs" if args.finetune_epochs else ""
    )
    _print(console, title, {"dense": dense, "pruned": small})
    if args.latency:
        from robustprune.export import latency

        one = x[:1].float() / 255 if x.dtype == torch.uint8 else x[:1].float()
        report = latency(model, pruned, example_inputs=one, runtime=args.latency)
        console.print(report.table(), highlight=False)
    if args.save:
        console.print(f"pruned model: {args.save}", highlight=False)
    _write_json(args.json, {"model": args.model, "data": args.data, "dense": dense, "pruned": small})
    return 0


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number; give a ratio in [0, 1), e.g. 0.3") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1); give e.g. 0.3")
    return value


def add_parsers(sub, whole_number, console) -> None:
    """The `evaluate` and `prune` sub-commands (whole_number: the CLI's check of counts; console:
    makes the CLI's console)."""

    def common(p) -> None:
        p.add_argument(
            "--model", required=True, help="a registered model (robustprune list) or package.module:function"
        )
        p.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="the model's arguments")
        p.add_argument("--weights", help="its weights: .safetensors (rp.save) or a torch state dict")
        p.add_argument("--data", required=True, help="a dataset (mnist, cifar10), an .npz file, an image folder or "
                       "package.module:function")  # fmt: skip
        p.add_argument("--data-dir", help="data folder of the registered datasets (default $ROBUSTPRUNE_DATA)")
        p.add_argument("--attack", action="append", default=[], metavar="LABEL:KEY=VALUE,...",
                       help="an attack, e.g. autoattack:eps=0.0313725 or pgd:eps=0.1,steps=20; repeatable")  # fmt: skip
        p.add_argument("--corruptions", type=whole_number, nargs="+", metavar="SEVERITY",
                       help="every common corruption at these severities (1-5)")  # fmt: skip
        p.add_argument("--occlusion", type=whole_number, nargs="+", metavar="PIXELS", help="centre occlusion sizes")
        p.add_argument("--test-subset", type=whole_number, help="the first N test images (default all)")
        p.add_argument("--attack-subset", type=whole_number, default=1000, help="attack the first N (default 1000)")
        p.add_argument("--shift-subset", type=whole_number, help="corrupt / occlude the first N (default all)")
        p.add_argument("--json", metavar="FILE", help="also write the metrics to this JSON file")

    e = sub.add_parser("evaluate", help="evaluate one model: clean, attacks, corruptions, occlusion")
    common(e)
    e.set_defaults(func=lambda args: cmd_evaluate(args, console()))
    p = sub.add_parser(
        "prune", help="prune one model, optionally fine-tune and save it, and compare it to the dense one"
    )
    common(p)
    p.add_argument("--method", default="global_magnitude", help="a pruning method (robustprune list)")
    p.add_argument("--ratio", type=_ratio, required=True, help="share removed, in [0, 1)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="the method's settings, e.g. criterion=taylor (repeatable)")  # fmt: skip
    p.add_argument("--finetune-epochs", type=int, default=0, help="fine-tune the pruned model (default 0)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    p.add_argument("--seed", type=int, default=0, help="fine-tuning seed (default 0)")
    p.add_argument("--save", metavar="FILE.safetensors", help="write the pruned model (weights and structure)")
    p.add_argument("--latency", choices=["torch", "onnxruntime", "both"],
                   help="also measure dense and pruned latency (batch 1 and 64, median) and the speed-up")  # fmt: skip
    p.set_defaults(func=lambda args: cmd_prune(args, console()))
