"""Bad input by class (issue 24): model arguments that cannot run, a study name used as a path,
unbounded input (file size, aliases, nesting, integers, grid size), duplicate keys, output cut when
it is not a terminal, non-finite numbers. Each class is tested over several members, not one
example; every test here is fast (no data set is read, no model is trained)."""

from __future__ import annotations

import math
import pickle
import time
import warnings
from pathlib import Path

import pytest
import yaml

from robustprune.cli import main
from robustprune.errors import UserError
from robustprune.models import MODELS, check_model
from robustprune.study.cells import count_cells, expand
from robustprune.study.schema import load_study, resolve_study

STUDIES = Path(__file__).resolve().parent.parent / "studies"
MNIST = dict(dataset="mnist", num_classes=10, image_shape=(1, 28, 28), mean=(0.5,), std=(0.5,))
CIFAR = dict(dataset="cifar10", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)
TINY_IMAGENET = dict(dataset="tiny_imagenet", num_classes=200, image_shape=(3, 64, 64), mean=(0.5,) * 3, std=(0.5,) * 3)


def study(**changes) -> dict:
    raw = {
        "name": "limits",
        "model": {"name": "mnist_cnn", "args": {"conv1": 4, "conv2": 8, "fc": 16}},
        "pruning": {"magnitude": {"method": "global_magnitude", "sparsities": [0.5]}},
    }
    return raw | changes


def refused(raw: dict, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        resolve_study(raw, "s.yaml", overrides=list(overrides))
    return str(e.value)


def file_refused(tmp_path: Path, text: str | bytes, seconds: float = 1.0) -> str:
    path = tmp_path / "s.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        load_study(path)
    assert time.perf_counter() - t0 < seconds, "refused, but not fast"
    assert "\n" not in str(e.value) and len(str(e.value)) < 400
    return str(e.value)


# ---- class 2: model arguments ---------------------------------------------------------------------

BAD_ARGS = [
    ("mnist_cnn", {"conv1": 0}, MNIST, "conv1 must be a whole number from 1"),
    ("mnist_cnn", {"conv2": -3}, MNIST, "conv2 must be a whole number from 1"),
    ("mnist_cnn", {"fc": 0}, MNIST, "fc must be a whole number"),
    ("mnist_cnn", {"conv1": 2.5}, MNIST, "conv1 must be a whole number"),
    ("mnist_cnn", {"conv1": True}, MNIST, "conv1 must be a whole number"),
    ("mnist_cnn", {"kernel_size": 0}, MNIST, "kernel_size must be a whole number"),
    ("mnist_cnn", {"padding": -1}, MNIST, "padding must be a whole number from 0"),
    ("mnist_cnn", {"kernel_size": 30}, MNIST, "cannot run on mnist images (1x28x28)"),
    ("mnist_cnn", {"kernel_size": 11}, MNIST, "cannot run on mnist images (1x28x28)"),
    ("mnist_cnn", {"kernel_size": 40, "padding": 2}, CIFAR, "cannot run on cifar10 images (3x32x32)"),
    ("mnist_cnn", {"conv1": 65536, "conv2": 65536}, MNIST, "parameters, over the limit of 1,000,000,000"),
    ("resnet20", {"width": 0}, CIFAR, "width must be a whole number"),
    ("resnet56", {"width": -1}, CIFAR, "width must be a whole number"),
    ("resnet18", {"width": 0.5}, CIFAR, "width must be a whole number"),
    ("resnet50", {"width": 0}, CIFAR, "width must be a whole number"),
    ("resnet34", {"stem": "huge"}, CIFAR, "unknown stem 'huge'"),
    ("vgg16_bn", {"width_mult": 0}, CIFAR, "width_mult must be a number above 0"),
    ("vgg16_bn", {"width_mult": -1.0}, CIFAR, "width_mult must be a number above 0"),
    ("vgg16_bn", {"width_mult": math.nan}, CIFAR, "width_mult must be a number above 0"),
    ("mobilenetv2", {"stem_stride": 0}, CIFAR, "stem_stride must be a whole number"),
    ("mobilenetv2", {"last_channels": 0}, CIFAR, "last_channels must be a whole number"),
    ("mobilevit_xs", {"patch": 0}, CIFAR, "patch must be a whole number"),
    ("mobilevit_xs", {"num_heads": 0}, CIFAR, "num_heads must be a whole number"),
    ("mobilevit_xs", {"num_heads": 7}, CIFAR, "cannot run on cifar10 images"),
    ("mobilevit_xs", {"dropout": 2.0}, CIFAR, "dropout must be a number from 0 up to"),
    ("mobilevit_xs", {"expansion": 0}, CIFAR, "expansion must be a whole number"),
    ("resnet32", {"width": 65537}, CIFAR, "width must be a whole number from 1 to 65536"),
]


@pytest.mark.parametrize("name, args, data, expect", BAD_ARGS, ids=[f"{n}-{a}" for n, a, _, _ in BAD_ARGS])
def test_model_args_that_cannot_run_are_one_sentence(name, args, data, expect):
    with pytest.raises(UserError) as e:
        check_model(name, args, **data)
    msg = str(e.value)
    assert msg.startswith(f"model '{name}' with args {{") and expect in msg and msg.endswith("; fix its args"), msg
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_passes_the_check_with_its_default_args(name):
    data = MNIST if name == "mnist_cnn" else CIFAR
    check_model(name, {}, **data)


def test_the_check_uses_the_datasets_shape():
    """A kernel of 11 leaves nothing of a 28x28 digit but fits 64x64 Tiny ImageNet images: refused on one
    and accepted on the other (the schema, which does not know the shape, refuses neither)."""
    with pytest.raises(UserError, match="mnist images"):
        check_model("mnist_cnn", {"kernel_size": 11}, **MNIST)
    check_model("mnist_cnn", {"kernel_size": 11}, **TINY_IMAGENET)
    resolve_study(study(dataset="tiny_imagenet", model={"name": "mnist_cnn", "args": {"kernel_size": 11}}), "s")


@pytest.mark.parametrize(
    "override, expect",
    [
        ("model.args.conv1=0", "model 'mnist_cnn' does not accept args {'conv1': 0, 'conv2': 8, 'fc': 16} (conv1 must"),
        ("model.args.fc=-1", "fc must be a whole number from 1 to 65536, got -1"),
        ("model={name: vgg16_bn, args: {width_mult: 0}}", "width_mult must be a number above 0"),
        ("model={name: resnet20, args: {width: 0}}", "width must be a whole number"),
        ("model.args.conv1=wide", "(conv1 must be a whole number from 1 to 65536, got wide)"),
        ("model.args.depth=3", "does not accept args"),
    ],
)
def test_model_args_are_refused_when_the_study_is_read(override, expect):
    assert expect in refused(study(), override)


def test_a_bad_arg_in_one_of_several_models_names_its_label():
    raw = study(
        models={"small": {"name": "mnist_cnn", "args": {"conv1": 4}}, "big": {"name": "mnist_cnn", "args": {"fc": 0}}}
    )
    del raw["model"]
    assert "model 'mnist_cnn' (models.big) does not accept args {'fc': 0} (fc must be" in refused(raw)


# ---- class 3: the study's name -------------------------------------------------------------------

BAD_NAMES = ["../../x", "/abs/x", "a/b", "a\\b", "", ".", "..", ".hidden", "-rf", "a b", "x" * 101, "naïve", "x\n"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_a_study_name_is_a_label_not_a_path(name):
    msg = refused(study(name=name))
    assert "is a label, not a path: use 1 to 100 letters, digits, '-', '_' or '.'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["mnist", "cifar_mrpf", "a.b-c_1", "0", "A" * 100])
def test_good_names_pass(name):
    assert resolve_study(study(name=name), "s").name == name


def test_the_default_output_folder_is_runs_name(tmp_path, monkeypatch, capsys):
    from robustprune.study import runner

    def stop(study, out_dir, *a, **kw):
        raise UserError(f"out={out_dir}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runner, "prepare", stop)  # (stops the run before anything is read or written)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study(name="mine")))
    assert main(["run", "s.yaml"]) == 2
    assert f"out={Path('runs', 'mine')}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---- class 4: unbounded input --------------------------------------------------------------------


def bomb(levels: int) -> str:
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text, expect",
    [
        ("name: x\n# " + "a" * 1_000_000 + "\n", "is larger than 1 MB"),
        ("name: x\n" + bomb(9), "expands to more than 100000 values"),
        ("name: x\n" + bomb(30), "expands to more than 100000 values"),
        ("name: x\ndescription: &d {a: *d}\n", "an alias refers to the list or mapping that contains it"),
        ("name: x\ndescription: " + "[" * 100_000 + "]" * 100_000 + "\n", "nesting is deeper than 50 levels"),
        ("name: x\n" + "".join("  " * i + f"k{i}:\n" for i in range(60)), "nesting is deeper than 50 levels"),
        ("name: x\ndescription: " + "9" * 5000 + "\n", "is out of range"),
        ("name: x\nseeds: [" + str(2**70) + "]\n", "the integer 1180591620717411303424 is out of range"),
        ("name: x\nseeds: [-" + str(2**64) + "]\n", "is out of range"),
        ("name: x\nseeds: [0b" + "1" * 70 + "]\n", "is out of range"),
    ],
    ids=[
        "1MB",
        "alias-bomb-9",
        "alias-bomb-30",
        "recursive-alias",
        "deep-list",
        "deep-map",
        "5000-digits",
        "2**70",
        "-2**64",
        "binary-70-bits",
    ],
)
def test_unbounded_yaml_is_refused_fast(tmp_path, text, expect):
    assert expect in file_refused(tmp_path, text)


def test_aliases_within_the_limits_still_work(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: anchors\n"
        "models:\n"
        "  a: {name: mnist_cnn, args: &w {conv1: 4, conv2: 8}}\n"
        "  b: {name: mnist_cnn, args: {<<: *w, conv1: 6}}\n"
    )
    s = load_study(path)
    assert s.models["a"].args == {"conv1": 4, "conv2": 8} and s.models["b"].args == {"conv1": 6, "conv2": 8}


SEED_FIELDS = [
    "seeds=[4294967296]",
    "seeds=[-1]",
    "model.seeds=[4294967296]",
    "evaluation.corruptions={seed: 4294967296}",
    "evaluation.security={eps: [0.1], seed: 4294967296}",
    "evaluation.single_element={seed: 99999999999}",
]


@pytest.mark.parametrize("override", SEED_FIELDS)
def test_every_seed_is_a_32_bit_seed(override):
    assert "seeds must be >= 0 and < 2**32 (torch and numpy take 32-bit seeds)" in refused(study(), override)


@pytest.mark.parametrize(
    "override, expect",
    [
        ("train.epochs=100000000", "'train.epochs': Input should be less than or equal to 10000"),
        ("finetune.epochs=100000", "'finetune.epochs'"),
        ("pruning.magnitude.finetune_epochs=[100000]", "'pruning.magnitude.finetune_epochs.0'"),
        ("train.batch_size=10000000000", "'train.batch_size'"),
        ("evaluation.batch_size=10000000000", "'evaluation.batch_size'"),
        ("evaluation.latency_batch=1000000", "'evaluation.latency_batch'"),
        ("train.crop_padding=100000", "'train.crop_padding'"),
        ("model.args.conv1=100000000", "conv1 must be a whole number from 1 to 65536"),
        ("model.args.conv1=9223372036854775808", "is out of range"),
    ],
)
def test_sizes_and_epochs_are_bounded(override, expect):
    assert expect in refused(study(), override)


def test_the_seeds_option_is_bounded_before_the_seed_list_is_made():
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="--seeds must be at most 1000, got 100000000000"):
        resolve_study(study(), "s", seeds=10**11)
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_cells_are_counted_without_building_them(path):
    for budget in ["full", *(yaml.safe_load(path.read_text()).get("budgets") or {})]:
        s = load_study(path, budget)
        assert count_cells(s) == len(expand(s)), budget


def test_a_grid_of_a_million_cells_is_refused_before_it_is_built(tmp_path, capsys):
    raw = study(seeds=list(range(1000)))
    raw["pruning"]["magnitude"]["sparsities"] = [i / 1000 for i in range(1000)]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert "the study has 1,001,000 cells, over the limit of 10,000" in err and "--max-cells 1001000" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "override, longest",
    [
        (f"model.name={'m' * 100_000}", 300),
        (f"dataset={'d' * 100_000}", 300),
        (f"train.optimizer={'o' * 100_000}", 300),
        (f"pruning.magnitude.sparsities={[0.5] * 20_000}", 300),
        (f"model.args.{'k' * 100_000}=1", 500),
        (f"{'k' * 100_000}=1", 300),
        (f"model.args.conv1={'w' * 100_000}", 500),
        (f"name={'n' * 100_000}", 300),
    ],
    ids=["model", "dataset", "literal", "repeats", "arg-key", "top-key", "arg-value", "name"],
)
def test_a_long_bad_value_is_quoted_as_a_short_excerpt(override, longest):
    msg = refused(study(), override)
    assert len(msg) < longest and "\n" not in msg, msg[:1000]


# ---- class 5: duplicate keys ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        ("name: a\nseeds: [0]\nname: b\n", "key 'name' appears twice (lines 1 and 3); keep one"),
        ("name: a\ntrain:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n",
         "key 'epochs' appears twice in 'train' (lines 3 and 5)"),
        ("name: a\nmodel: {name: mnist_cnn, args: {conv1: 4, conv1: 6}}\n",
         "appears twice in 'model.args' (lines 2 and 2)"),
        ("name: a\nbudgets:\n  smoke:\n    train.epochs: 1\n    train.epochs: 2\n",
         "key 'train.epochs' appears twice in 'budgets.smoke' (lines 4 and 5)"),
        ("name: a\nbudgets:\n  smoke: {}\n  smoke: {train.epochs: 1}\n", "key 'smoke' appears twice in 'budgets'"),
        ("name: a\nclaims:\n  - {name: c, name: d}\n", "key 'name' appears twice in 'claims[0]'"),
        ("name: a\nseeds: [0]\n1: x\n0x1: y\n", "key '1' appears twice (lines 3 and 4)"),
    ],
    ids=["top-level", "nested", "flow-mapping", "budget-key", "budget-name", "in-a-list", "same-int"],
)  # fmt: skip
def test_duplicate_keys_are_refused_with_both_lines(tmp_path, text, expect):
    assert expect in file_refused(tmp_path, text)


def test_a_duplicate_key_in_a_set_value_is_refused():
    assert "--set model.args: key 'conv1' appears twice" in refused(study(), "model.args={conv1: 4, conv1: 6}")


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: a\nmodel: {name: mnist_cnn, args: {conv1: 4}}\n"
        "budgets:\n  base: &b {train.epochs: 1, train.lr: 0.1}\n  quick: {<<: *b, train.epochs: 2}\n"
    )
    assert load_study(path, "quick").train.epochs == 2


# ---- class 10: output that is not a terminal is never cut ------------------------------------------


def test_list_to_a_file_keeps_long_words_whole(monkeypatch, capsys):
    word = "supercalifragilistic" * 12  # 240 characters: wider than any default width
    monkeypatch.setitem(MODELS._docs, "mnist_cnn", f"A model whose doc ends in {word}.")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert word in out


def test_a_report_to_a_file_keeps_wide_tables_whole(tmp_path, capsys):
    """A row label wider than any terminal (200 characters): a terminal crops it at its edge, a
    file gets it whole, with the caption's words whole too."""
    from robustprune.study.store import Store

    label = "magnitude_" + "x" * 190
    s = resolve_study(study(pruning={label: {"method": "global_magnitude", "sparsities": [0.5]}}), "s")
    cells = expand(s)
    store = Store(tmp_path / "results.sqlite")
    try:
        for c in cells:
            store.put(c, {"acc_clean": 0.9, "sparsity": c.axes["sparsity"]}, 1.0)
        store.record_run(s.name, "full", "robustprune run s.yaml", s.model_dump(mode="json"), [c.hash for c in cells])
    finally:
        store.close()
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert label in out
    assert "share of the dense model's conv/linear weights removed" in " ".join(out.split())


# ---- class 11: smaller messages ------------------------------------------------------------------


@pytest.mark.parametrize("item", ["=5", " =5", "=", "= x"])
def test_a_set_without_a_key_says_so(item):
    msg = refused(study(), item)
    assert msg == f"--set {' '.join(item.split())} has no key; write --set KEY=VALUE, e.g. --set train.epochs=3"


NON_FINITE = [
    ("train.lr=.inf", "'train.lr' is inf, not a finite number"),
    ("train.lr=.nan", "'train.lr' is nan, not a finite number"),
    ("train.lr=-.inf", "'train.lr' is -inf, not a finite number"),
    ("train.lr=1e999", "finite number"),  # (YAML 1.1 reads 1e999 as a string; pydantic would make it inf)
    ("train.lr=inf", "finite number"),  # a string that pydantic would read as inf
    ("finetune.weight_decay=.inf", "'finetune.weight_decay' is inf"),
    ("pruning.magnitude.sparsities=[.nan]", "'pruning.magnitude.sparsities[0]' is nan"),
    ("pruning.magnitude.params={x: .inf}", "'pruning.magnitude.params.x' is inf"),
    ("evaluation.attacks.fgsm.eps=[.inf]", "'evaluation.attacks.fgsm.eps[0]' is inf"),
    ("evaluation.attacks.pgd={eps: [1.5], params: {norm: L2}}", None),  # (finite: the control)
    ("evaluation.masking_tolerance=.nan", "'evaluation.masking_tolerance' is nan"),
    ("model.args.conv1=.inf", "'model.args.conv1' is inf"),
    ("model.train={lr: .nan}", "'model.train.lr' is nan"),
    ("regimes={noisy_labels: {rate: .nan}}", "'regimes.noisy_labels.rate' is nan"),
    ("train.adversarial={eps: .inf}", "'train.adversarial.eps' is inf"),
]


@pytest.mark.parametrize("override, expect", NON_FINITE, ids=[o for o, _ in NON_FINITE])
def test_non_finite_numbers_are_refused_everywhere(override, expect):
    if expect is None:
        resolve_study(study(), "s", overrides=[override])
        return
    msg = refused(study(), override)
    assert expect in msg and "\n" not in msg, msg


def test_a_raw_pickle_as_weights_gives_the_sentence_and_no_torch_warning(tmp_path):
    from robustprune import checkpoint

    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UserError, match="weights file"):
            checkpoint.load_weights(path)
    assert not caught, [str(w.message) for w in caught]
