"""The study file: validation, budgets, overrides, and the expansion into hashed cells."""

from __future__ import annotations

import copy

import pytest
import yaml

from robustprune.errors import UserError
from robustprune.study.cells import config_hash, expand
from robustprune.study.schema import load_study, parse_set, resolve_study


@pytest.fixture(scope="module")
def raw(study_file) -> dict:
    return yaml.safe_load(study_file.read_text())


@pytest.fixture(scope="module")
def full(raw):
    return resolve_study(raw, "test", "full")


@pytest.fixture(scope="module")
def smoke(raw):
    return resolve_study(raw, "test", "smoke")


# ---- loading ---------------------------------------------------------------------------------------


def test_load_study_full(study_file):
    s = load_study(study_file, "full")
    assert s.name == "mnist_pruning_robustness" and s.dataset == "mnist"
    assert s.train.epochs == 3 and s.train.lr == 0.05 and s.finetune.lr == 0.01
    assert s.model.name == "mnist_cnn" and s.model.args == {
        "conv1": 8,
        "conv2": 16,
        "fc": 128,
        "kernel_size": 5,
        "padding": 0,
    }
    assert list(s.regimes) == ["clean", "spurious", "noisy_labels", "fgsm_data"]
    assert s.pruning["magnitude"].sparsities == [0.1, 0.3, 0.5, 0.7]
    assert s.pruning["structured"].finetune_epochs == [0, 5]
    assert s.pruning["lottery"].params == {"rounds": 5, "rate": 0.2, "epochs": 2}
    ev = s.evaluation
    assert ev.attacks["fgsm"].eps == [0.05, 0.1, 0.2, 0.3] and ev.attacks["pgd20"].attack == "pgd"
    assert ev.attacks["pgd20"].params == {"steps": 20, "step_size": 0.01, "random_start": False}
    assert ev.occlusion == [2, 4, 6, 8, 10, 12, 14, 16] and len(ev.corruption_types()) == 15
    assert ev.transfer.attack == "pgd20" and ev.transfer_eps() == 0.1 and len(ev.transfer.models) == 3
    assert s.seeds == [0]
    assert s.data.train_subset is None
    assert [r.label for r in s.table1.rows] == [
        "Magnitude (50%)",
        "Structured channel (30%)",
        "Lottery ticket (best round)",
    ]


def test_load_study_smoke(study_file):
    s = load_study(study_file, "smoke")
    assert s.data.train_subset == 4000 and s.data.test_subset == 500 and s.train.epochs == 2
    assert s.pruning["magnitude"].sparsities == [0.5] and s.pruning["magnitude"].finetune_epochs == [0, 1]
    assert s.pruning["structured"].sparsities == [0.3]
    assert s.pruning["lottery"].params == {"rounds": 2, "rate": 0.2, "epochs": 1}
    assert s.pruning["magnitude"].method == "global_magnitude"  # untouched keys of a section are kept


def test_resolve_does_not_modify_the_raw_tree(raw):
    before = copy.deepcopy(raw)
    resolve_study(raw, "test", "smoke", seeds=2, overrides=["train.epochs=7"])
    assert raw == before


def test_unknown_budget_names_known_budgets(study_file):
    with pytest.raises(UserError, match="no budget 'tiny'; known budgets: claims, full, smoke"):
        load_study(study_file, "tiny")


def test_full_budget_need_not_be_listed(raw):
    tree = {k: v for k, v in raw.items() if k != "budgets"}
    assert resolve_study(tree, "test", "full").train.epochs == 3
    with pytest.raises(UserError, match="known budgets: full$"):
        resolve_study(tree, "test", "smoke")


def test_overrides_have_yaml_types(raw):
    s = resolve_study(
        raw,
        "test",
        "full",
        overrides=[
            "train.epochs=5",
            "train.lr=0.1",
            "evaluation.attacks.fgsm.eps=[0.05, 0.1]",
            "train.nesterov=false",
            "data.train_subset=100",
        ],
    )
    assert s.train.epochs == 5 and isinstance(s.train.epochs, int)
    assert s.train.lr == 0.1 and isinstance(s.train.lr, float)
    assert s.evaluation.attacks["fgsm"].eps == [0.05, 0.1] and s.train.nesterov is False
    assert s.data.train_subset == 100


def test_overrides_beat_the_budget(raw):
    assert resolve_study(raw, "test", "smoke", overrides=["train.epochs=3"]).train.epochs == 3
    assert resolve_study(raw, "test", "smoke").train.epochs == 2


def test_parse_set():
    assert parse_set(["a.b=3", "c= [1, 2]", "d=x=y", "e="]) == {"a.b": 3, "c": [1, 2], "d": "x=y", "e": None}


def test_seeds(raw):
    assert resolve_study(raw, "test", "full", seeds=3).seeds == [0, 1, 2]
    assert resolve_study(raw, "test", "full", seeds=1).seeds == [0]
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        resolve_study(raw, "test", "full", seeds=0)


BAD_OVERRIDES = [
    ("bogus=1", "unknown key 'bogus'"),
    ("train.epochz=3", "unknown key 'train.epochz'"),
    ("regimes.rainy={}", "unknown training regime 'rainy'; known: clean, fgsm_data, noisy_labels, spurious"),
    (
        "pruning.magnitude.method=magic",
        "unknown pruning method 'magic'; known: channel_l1, global_magnitude, lottery_ticket",
    ),
    ("model.name=resnet", "unknown model 'resnet'; did you mean"),
    ("dataset=svhn", "unknown dataset 'svhn'; known: cifar10, cifar100, mnist, tiny_imagenet"),
    ("pruning.magnitude.sparsities=[1.0]", "'pruning.magnitude.sparsities': sparsity 1.0 is outside [0, 1)"),
    ("pruning.magnitude.sparsities=[-0.1]", "'pruning.magnitude.sparsities': sparsity -0.1 is outside [0, 1)"),
    ("pruning.magnitude.sparsities=[]", "pruning 'magnitude' lists no sparsities"),
    ("train.epochs=-1", "'train.epochs': Input should be greater than or equal to 0"),
    ("train.epochs=2.5", "'train.epochs': Input should be a valid integer"),
    ("finetune.epochs=-1", "'finetune.epochs': Input should be greater than or equal to 0"),
    (
        "pruning.magnitude.finetune_epochs=[-1]",
        "'pruning.magnitude.finetune_epochs': fine-tuning epochs -1 is negative",
    ),
    ("pruning.magnitude.finetune_epochs=[]", "'pruning.magnitude.finetune_epochs': needs at least one value"),
    ("seeds=[]", "'seeds': needs at least one seed"),
    ("seeds=[-1]", "'seeds': seeds must be >= 0"),
    ("evaluation.attacks.fgsm.eps=[-0.1]", "'evaluation.attacks.fgsm.eps': eps -0.1 is outside [0, 1]"),
    ("evaluation.attacks.fgsm.eps=[1.5]", "'evaluation.attacks.fgsm.eps': eps 1.5 is outside [0, 1]"),
    ("evaluation.attacks.fgsm.eps=[]", "'evaluation.attacks.fgsm.eps': needs at least one eps"),
    ("evaluation.attacks.cw={eps: [0.1]}", "unknown attack 'cw'; known: apgd_ce, apgd_dlr, apgd_t, autoattack, fab"),
    ("evaluation.attacks.pgd20.attack=pgdd", "unknown attack 'pgdd'; did you mean 'pgd'?"),
    ("evaluation.attacks.pgd20.params.steps=0", "attack 'pgd20': PGD steps must be an integer >= 1, got 0"),
    ("evaluation.attacks.apgd_ce.params.steps=-3", "attack 'apgd_ce': APGD-CE steps must be an integer >= 1"),
    ("evaluation.attacks.pgd20.params.stepz=3", "attack 'pgd20' does not accept params"),
    ("evaluation.attacks.pgd20.params.step_size=-1", "PGD step_size must be a finite number >= 0"),
    ("evaluation.occlusion=[0]", "'evaluation.occlusion': occlusion size 0 must be at least 1 pixel"),
    ("evaluation.corruptions.types=[fgo]", "unknown corruption 'fgo'; did you mean 'fog'?"),
    ("evaluation.corruptions.types=[]", "corruptions.types lists no corruption"),
    ("evaluation.corruptions.severities=[6]", "severity 6 is not one of 1, 2, 3, 4, 5"),
    ("evaluation.corruptions.source=cifar10c", "source 'cifar10c' needs cifar10c_dir"),
    ("evaluation.transfer.attack=cw", "transfer.attack 'cw' is not an entry of evaluation.attacks"),
    ("evaluation.transfer.eps=0.3", "transfer.eps 0.3 is not one of attack 'pgd20''s eps [0.1, 0.2]"),
    ("evaluation.transfer.models=[dense]", "needs at least two models"),
    ("evaluation.transfer.models=[dense, nope]", "names pruning 'nope', which the study does not run"),
    (
        "evaluation.transfer.models=[dense, {pruning: magnitude, sparsity: 0.4, finetune_epochs: 1}]",
        "needs a sparsity the study runs ([0.1, 0.3, 0.5, 0.7])",
    ),
    ("evaluation.transfer.models=[dense, {pruning: lottery, round: 9}]", "needs a round between 1 and 5"),
    ("evaluation.masking_tolerance=-0.1", "'evaluation.masking_tolerance': Input should be greater than or equal to 0"),
    ("evaluation.attack_subset=0", "'evaluation.attack_subset': Input should be greater than or equal to 1"),
    ("regimes={}", "'regimes': needs at least one training regime"),
    ("train.epochs", "--set 'train.epochs' is not KEY=VALUE"),
    ("train.epochs=[1", "--set train.epochs: the value '[1' is not valid YAML"),
    ("name.x=1", "cannot set 'name.x' because 'name' is not a section"),
    ("table1.rows=[{label: X, pruning: nope}]", "table1 row 'X' names pruning 'nope', which the study does not run"),
    (
        "table1.columns={X: [rainy, acc_clean]}",
        "table1 column 'X' names regime 'rainy', which the study does not train",
    ),
    ("budgets=3", "'budgets': Input should be a valid dictionary"),
]


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_a_user_error(raw, override, expected):
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test", "full", overrides=[override])
    assert expected in str(e.value)


# BUG: robustprune/study/schema.py StudyConfig._names_exist validates regime and method params with
# REGIMES.get(name).Params(**params) / method.Params(**p.params) inside the model validator; pydantic
# re-raises the inner errors with their own location only ('rate', 'foo'), so the message does not
# say which section is wrong. Suggested fix: catch ValidationError there and raise
# ValueError(f"regime '{name}': {describe...}") (or UserError) naming regimes.<name>.<key> /
# pruning.<label>.params.<key>.
NESTED_PARAMS = [
    ("regimes.noisy_labels={rate: 2}", "regimes.noisy_labels"),
    ("regimes.clean={foo: 1}", "regimes.clean"),
    ("pruning.lottery.params={rounds: 0}", "pruning.lottery"),
    ("pruning.magnitude.params={foo: 1}", "pruning.magnitude"),
]


@pytest.mark.parametrize("override, where", NESTED_PARAMS, ids=[o for o, _ in NESTED_PARAMS])
def test_bad_nested_params_name_their_section(raw, override, where):
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test", "full", overrides=[override])
    assert where in str(e.value)


def test_unknown_model_argument_is_caught_before_running(raw):
    # BUG: robustprune/study/schema.py StudyConfig._names_exist never checks model.args, so a typo
    # such as conv9 passes validation and only fails as a TypeError when the runner builds the model
    # (after data loading, possibly after other cells ran). Suggested fix: in _names_exist, check the
    # keys against inspect.signature(MODELS.get(name)) / the model's __init__ (or build the model once
    # on the meta device) and raise ValueError("model.args: unknown argument 'conv9' ...").
    with pytest.raises(UserError, match="conv9"):
        resolve_study(raw, "test", "full", overrides=["model.args={conv9: 3}"])


def test_table1_row_sparsity_must_be_run(raw):
    # BUG: robustprune/study/schema.py StudyConfig._names_exist checks that a table1 row's pruning entry
    # exists but not that its sparsity is one the entry runs; a row with sparsity 0.4 for 'magnitude'
    # (sparsities 0.1/0.3/0.5/0.7) validates and Table 1 silently shows '—'. Suggested fix: for a
    # non-iterative method, raise ValueError when row.sparsity is not None and not in p.sparsities
    # (and when it is None, since table1() then looks for lottery rounds that never exist).
    with pytest.raises(UserError, match="0.4"):
        resolve_study(raw, "test", "full", overrides=["table1.rows=[{label: X, pruning: magnitude, sparsity: 0.4}]"])


BAD_FILES = [
    ("name: [unclosed\n", "is not valid YAML at line"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("just a string\n", "must be a YAML mapping"),
    ("", "must be a YAML mapping"),
    ("description: no name\n", "'name' is required"),
    ("name: x\nbogus: 1\n", "unknown key 'bogus'"),
    ("name: x\ntrain: {epochz: 3}\n", "unknown key 'train.epochz'"),
    ("name: x\nregimes: {rainy: {}}\n", "unknown training regime 'rainy'"),
    ("name: x\nbudgets: [a]\n", "'budgets' must be a mapping"),
]


@pytest.mark.parametrize("text, expected", BAD_FILES, ids=[t.split("\n")[0] or "empty" for t, _ in BAD_FILES])
def test_bad_study_file_is_a_user_error(tmp_path, text, expected):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_study(path, "full")
    assert expected in str(e.value)
    assert str(path) in str(e.value)


def test_missing_study_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


def test_minimal_study_gets_defaults(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: tiny\n")
    s = load_study(path, "full")
    assert s.regimes == {"clean": {}} and s.pruning == {} and s.seeds == [0] and s.train.epochs == 2
    assert len(expand(s)) == 1


# ---- cells --------------------------------------------------------------------------------------------


def test_cell_counts(full, smoke):
    cells = expand(full)
    assert len(cells) == 4 * (1 + 4 * 2 + 4 * 2 + 5) == 88
    assert len(expand(smoke)) == 4 * (1 + 1 * 2 + 1 * 2 + 2) == 28
    per_regime = {}
    for c in cells:
        per_regime[c.axes["regime"]] = per_regime.get(c.axes["regime"], 0) + 1
    assert per_regime == {"clean": 22, "spurious": 22, "noisy_labels": 22, "fgsm_data": 22}
    assert sum(c.axes["pruning"] == "dense" for c in cells) == 4
    assert sum(c.axes["pruning"] == "lottery" for c in cells) == 20


def test_cell_axes(smoke):
    cells = [c for c in expand(smoke) if c.axes["regime"] == "clean"]
    assert [c.axes["pruning"] for c in cells] == [
        "dense",
        "magnitude",
        "magnitude",
        "structured",
        "structured",
        "lottery",
        "lottery",
    ]
    keys = {"regime", "pruning", "method", "sparsity", "finetune_epochs", "round", "seed"}
    assert all(set(c.axes) == keys for c in cells)
    assert cells[0].axes == {
        "regime": "clean",
        "pruning": "dense",
        "method": None,
        "sparsity": 0.0,
        "finetune_epochs": 0,
        "round": None,
        "seed": 0,
    }
    assert [c.axes["finetune_epochs"] for c in cells[1:3]] == [0, 1]
    assert cells[2].config["pruning"]["finetune"]["epochs"] == 1 and cells[1].config["pruning"]["finetune"] is None
    assert cells[2].config["pruning"]["finetune"]["lr"] == 0.01
    lottery = cells[5:]
    assert [c.axes["round"] for c in lottery] == [1, 2]
    assert lottery[0].axes["sparsity"] == pytest.approx(0.2) and lottery[1].axes["sparsity"] == pytest.approx(0.36)
    assert cells[0].label == "clean / dense / seed 0"
    assert cells[6].label == "clean / lottery round 2 / seed 0"
    assert cells[1].label == "clean / magnitude s=0.5 ft=0 / seed 0"


def test_hashes_unique_and_stable(raw, full):
    cells = expand(full)
    hashes = [c.hash for c in cells]
    assert len(set(hashes)) == len(hashes)
    assert all(len(h) == 16 for h in hashes)
    again = expand(resolve_study(raw, "other source name", "full"))
    assert [c.hash for c in again] == hashes
    three = expand(resolve_study(raw, "test", "full", seeds=3))
    assert len(three) == 3 * 88 and len({c.hash for c in three}) == 3 * 88
    assert {c.hash for c in three if c.axes["seed"] == 0} == set(hashes)


@pytest.mark.parametrize(
    "override", ["seeds=[0, 0]", "pruning.magnitude.sparsities=[0.5, 0.5]", "pruning.structured.finetune_epochs=[0, 0]"]
)
def test_duplicate_axis_values_never_give_duplicate_cells(raw, override):
    # BUG: robustprune/study/schema.py accepts repeated values in seeds / sparsities / finetune_epochs,
    # and cells.expand then yields several cells with the same hash (counted twice in progress and
    # totals, the second put() is silently dropped). Suggested fix: in StudyConfig._seeds and
    # PruningConfig._sparsity_range/_epochs raise ValueError("... lists 0.5 twice") when
    # len(set(v)) != len(v).
    try:
        study = resolve_study(raw, "test", "full", overrides=[override])
    except UserError as e:
        assert "twice" in str(e) or "duplicate" in str(e) or "unique" in str(e)
        return
    hashes = [c.hash for c in expand(study)]
    assert len(hashes) == len(set(hashes))


def test_training_change_changes_every_hash(raw, full):
    before = {c.hash for c in expand(full)}
    after = {c.hash for c in expand(resolve_study(raw, "test", "full", overrides=["train.epochs=5"]))}
    assert len(after) == 88 and not before & after


def test_eval_change_keeps_dense_keys(raw, full):
    a = expand(full)
    b = expand(resolve_study(raw, "test", "full", overrides=["evaluation.attacks.fgsm.eps=[0.2]"]))
    assert not {c.hash for c in a} & {c.hash for c in b}
    assert [config_hash(c.dense_key) for c in a] == [config_hash(c.dense_key) for c in b]
    assert len({config_hash(c.dense_key) for c in a}) == 4  # one dense model per regime and seed


def test_finetune_change_keeps_unfinetuned_cells(raw, full):
    a = {c.hash: c for c in expand(full)}
    b = {c.hash: c for c in expand(resolve_study(raw, "test", "full", overrides=["finetune.lr=0.02"]))}
    kept = set(a) & set(b)
    assert kept == {h for h, c in a.items() if c.axes["finetune_epochs"] == 0}
    assert len(kept) == 4 * (1 + 4 + 4 + 5)


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
