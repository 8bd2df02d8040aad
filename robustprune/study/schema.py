"""The study file: a YAML document validated by pydantic (unknown keys are errors), with named
budgets (dotted overrides) and command-line --set overrides applied before validation."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from robustprune.errors import UserError, excerpt
from robustprune.evaluation.config import (  # noqa: F401  (part of the study file; importable from here as before)
    AttackEntry,
    CorruptionsConfig,
    EvaluationConfig,
    ModelSelector,
    SecurityConfig,
    SingleElementConfig,
    TransferConfig,
)
from robustprune.settings import Seed, Strict, check_seed, no_repeats
from robustprune.study.yamlfile import StudyYAMLError, load_yaml, read_study_text
from robustprune.train import MAX_EPOCHS, TrainConfig


def _check_params(params_cls, params: dict, where: str) -> None:
    """Validate a registry entry's parameters, naming the section in the error."""
    try:
        params_cls(**(params or {}))
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise ValueError(f"unknown parameter '{where}.{key}'") from None
        raise ValueError(f"'{where}.{key}': {err['msg']}") from None


def _changes_valid(build, where: str) -> None:
    """Build a TrainConfig with a section's changes applied, naming the bad key in the error."""
    try:
        build()
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ValueError(f"{where}.{key}: {what}") from None


MAX_SEEDS = 1000  # --seeds N
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class DataConfig(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
    # the study's own data instead of a registered dataset (at most one of these)
    folder: str | None = Field(None, description="an image folder: train/<class>/*.png|jpg and test/<class>/ (or val/)")
    image_size: int | None = Field(None, ge=1, le=4096, description="folder: resize every image to this side")
    npz: str | None = Field(None, description="an .npz file holding x_train, y_train, x_test and y_test")
    import_: str | None = Field(
        None,
        alias="import",
        description="'package.module:function' returning (train, test) (each (x, y) tensors, a Dataset or a "
        "DataLoader) or a dict with x_train, y_train, x_test and y_test; images in [0, 1] or uint8",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="import: the function's arguments")
    train_subset: int | None = Field(None, ge=1, description="use only the first N training images")
    test_subset: int | None = Field(None, ge=1, description="use only the first N test images")
    validation: int = Field(
        0,
        ge=0,
        description="hold out the last N training images (after the regime is applied) as a validation split: "
        "every model reports val_acc on it, and every choice of a 'best' model (the lottery ticket's round, a "
        "claim arm's choice among entries such as penalty weights) is made on it, never on the test set",
    )


class ModelConfig(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)
    name: str = "mnist_cnn"
    import_: str | None = Field(
        None,
        alias="import",
        description="your own architecture: 'package.module:function' (or a class) that builds it from args (and "
        "num_classes, image_shape, mean, std where it names them); it takes images in [0, 1]",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("args", "kwargs"), description="the builder's arguments"
    )
    weights: str | None = Field(
        None,
        description="weights that are the dense model instead of training one: a .safetensors file (rp.save, "
        "pruned structure included) or a state dict (torch.save(model.state_dict(), path)); relative to the "
        "working folder",
    )

    @model_validator(mode="before")
    @classmethod
    def _own_model(cls, data):
        # an imported builder is registered under its own name, so everything that builds by name builds it
        spec = data.get("import", data.get("import_")) if isinstance(data, dict) else None
        if spec is None:
            return data
        if not isinstance(spec, str):
            raise ValueError("import must be a string 'package.module:function'")
        from robustprune.models.user import register_import, registered_name

        if data.get("name") not in (None, registered_name(spec)):
            raise ValueError(f"give either name ('{data['name']}', a registered model) or import, not both")
        return {**data, "name": register_import(spec)}

    train: dict[str, Any] = Field(
        default_factory=dict,
        description="this architecture's changes to the study's train settings, e.g. {epochs: 2, lr: 0.05}",
    )
    seeds: list[Seed] | None = Field(
        None, description="the study's seeds this architecture runs (default all): one seed for an expensive model"
    )


class PruningConfig(Strict):
    """One pruning experiment: a method at several sparsities, each with and without fine-tuning;
    or an iterative method (lottery ticket) whose every round is a cell."""

    method: str
    sparsities: list[float] = Field(default_factory=list)
    finetune_epochs: list[Annotated[int, Field(le=MAX_EPOCHS)]] = Field(default_factory=lambda: [0])
    params: dict[str, Any] = Field(default_factory=dict)
    adjust: list[Literal["finetune", "scratch_e", "scratch_b", "winning_ticket"]] = Field(
        default_factory=lambda: ["finetune"],
        description="parameter adjustment after pruning (Jordão & Pedrini Table 3); finetune uses finetune_epochs",
    )
    rewind_epoch: int | None = Field(
        None,
        ge=0,
        le=MAX_EPOCHS,
        description="winning_ticket: rewind to the dense weights after this epoch (default 1)",
    )
    rewind_fraction: float | None = Field(
        None,
        description="winning_ticket: rewind to the dense weights after round(fraction x the dense model's epochs), "
        "resolved per architecture, instead of rewind_epoch (Jordão & Pedrini: epoch 50 of 200, 0.25)",
    )
    scratch_b: Literal["epochs", "flops"] = Field(
        "epochs",
        description="Scratch-B's training budget: 'epochs' trains twice the dense model's epochs (Jordão & Pedrini); "
        "'flops' as many training FLOPs as the dense model's, i.e. epochs x dense / pruned FLOPs (Liu et al. 2019)",
    )
    models: list[str] | None = Field(None, description="labels of `models` this entry prunes (default: every one)")
    finetune: dict[str, Any] = Field(
        default_factory=dict,
        description="this entry's changes to the study's "
        "finetune settings, e.g. {adversarial: {attack: fgsm, eps: 0.0078, ratio: 0.2}}",
    )

    @field_validator("adjust")
    @classmethod
    def _adjust(cls, v):
        if not v:
            raise ValueError("needs at least one scheme (finetune, scratch_e, scratch_b, winning_ticket)")
        no_repeats(v)
        return v

    @field_validator("rewind_fraction")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"rewind_fraction {v} is outside [0, 1); give the share of the dense training, e.g. 0.25")
        return v

    @model_validator(mode="after")
    def _one_rewind(self):
        if self.rewind_epoch is not None and self.rewind_fraction is not None:
            raise ValueError(
                f"rewind_epoch {self.rewind_epoch} and rewind_fraction {self.rewind_fraction} are both given; keep "
                f"one (a budget that sets one can set the other to null)"
            )
        return self

    def rewind_at(self, dense_epochs: int) -> int:
        """The winning ticket's rewind epoch for a dense model trained `dense_epochs` epochs."""
        if self.rewind_fraction is not None:
            return round(self.rewind_fraction * dense_epochs)
        return 1 if self.rewind_epoch is None else self.rewind_epoch

    @field_validator("sparsities")
    @classmethod
    def _sparsity_range(cls, v):
        no_repeats(v)
        for s in v:
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity {s} is outside [0, 1)")
        return v

    @field_validator("finetune_epochs")
    @classmethod
    def _epochs(cls, v):
        if not v:
            raise ValueError("needs at least one value (0 means no fine-tuning)")
        no_repeats(v)
        for e in v:
            if e < 0:
                raise ValueError(f"fine-tuning epochs {e} is negative")
        return v


class Arm(ModelSelector):
    """One side of a claim: a model of each seed (as in transfer.models) in one regime. An arm may
    choose, per seed, on validation accuracy (val_acc, never a test metric): `round: best` is the
    lottery round with the highest val_acc; a list of pruning entries (e.g. one per penalty weight)
    is the entry with the highest val_acc."""

    pruning: str | list[str] = Field(  # type: ignore[assignment]
        description="a pruning entry (or 'dense'); a list: the one with the best val_acc, per seed"
    )
    regime: str | None = Field(None, description="the regime (default: the study's only one)")
    round: int | Literal["best"] | None = None
    finetune_epochs: int | None = Field(
        None, description="default: whatever the budget fine-tunes for (claims then hold across budgets)"
    )
    paper_clean: float | None = Field(
        None,
        description="this model's clean accuracy in the paper (%): a claim is not measurable when ours is "
        "more than 10 points under it",
    )

    @field_validator("pruning")
    @classmethod
    def _some_entries(cls, v):
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("a list of pruning entries to choose among needs at least one entry, each once")
        return v

    def prunings(self) -> list[str]:
        return self.pruning if isinstance(self.pruning, list) else [self.pruning]

    def chooses(self) -> bool:
        """Whether this arm picks one of several models per seed (on the validation split)."""
        return self.round == "best" or isinstance(self.pruning, list)

    def matches(self, axes: dict) -> bool:
        if isinstance(self.pruning, list):
            return any(self.model_copy(update={"pruning": p}).matches(axes) for p in self.pruning)
        if self.finetune_epochs is None and self.pruning != "dense" and axes.get("round") is None:
            return ModelSelector.matches(self.model_copy(update={"finetune_epochs": axes["finetune_epochs"]}), axes)
        return super().matches(axes)


class Claim(Strict):
    """A central claim of the study's paper: arm a minus arm b on a metric, paired per seed."""

    name: str
    table: str = Field("", description="where the paper states it, e.g. 'Table 1'")
    a: Arm | list[Arm] = Field(description="a model, or several whose metric is averaged per seed")
    b: Arm | list[Arm]
    metric: str | list[str] = Field(
        description="a metric name (acc_clean, acc_fgsm_data) or a table column source (clean, pgd20@0.0313725, "
        "corruptions@5); a list is averaged per seed (e.g. a paper's 'Avg.' column)"
    )
    paper: float = Field(description="the paper's a - b in percentage points; its sign is the claim (0: no difference)")
    paper_b: float | None = Field(
        None, description="the paper's value of the metric for arm b (%), e.g. the dense model's PGD-20 accuracy"
    )
    reading: str | None = Field(None, description="which convention the metric follows, e.g. the eps reading")
    margin: float = Field(0.5, gt=0, description="p.p. within which a claim of no difference (paper: 0) holds")

    @field_validator("a", "b", mode="before")
    @classmethod
    def _shorthand(cls, v):
        one = lambda m: {"pruning": m} if isinstance(m, str) else m  # noqa: E731
        return [one(m) for m in v] if isinstance(v, list) else one(v)

    def arms(self, side: str) -> list[Arm]:
        v = getattr(self, side)
        return v if isinstance(v, list) else [v]

    def metrics(self) -> list[str]:
        return self.metric if isinstance(self.metric, list) else [self.metric]


class TableRow(Strict):
    label: str
    pruning: str
    sparsity: float | None = None


class Table1Config(Strict):
    """Rows and columns of the paper's Table 1: each column is (regime, metric)."""

    columns: dict[str, tuple[str, str]] = Field(default_factory=dict)
    rows: list[TableRow] = Field(default_factory=list)


class PaperTable(Strict):
    """A comparison table in a paper's layout (Bai et al. Tables 1-5). 'methods': one row per
    entry and sparsity, with its FLOPs reduction (Tables 2-5); 'flops': one row per FLOPs
    reduction, one group of columns per entry (Table 1)."""

    title: str
    rows: dict[str, str] = Field(
        description="row label -> pruning entry, 'entry@sparsity' for one sparsity, or 'dense'"
    )
    columns: dict[str, str] = Field(
        description="column label -> 'clean', an attack label of evaluation.attacks "
        "(at its reported eps), 'label@eps', or 'metric:<stored metric>'"
    )
    layout: Literal["methods", "flops"] = "methods"
    transpose: bool = Field(
        False, description="methods layout: methods as columns, the metrics as rows (reverse-pruning paper, Table 2)"
    )
    show_flops: bool = Field(True, description="methods layout: the FLOPs-reduction column")
    row_header: str = Field("Method", description="header of the row-label column")
    dense: bool = Field(True, description="begin each architecture with the dense model's row")
    models: list[str] | None = Field(None, description="architectures shown (default: every one with results)")
    sparsities: list[float] | None = Field(None, description="sparsities shown (default: every one with results)")
    regime: str = Field("clean", description="the training regime whose models are shown")


class StudyConfig(Strict):
    name: str = Field(description="a label: names the default output folder runs/<name> and every stored row")
    description: str = ""
    dataset: str = "mnist"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    models: dict[str, ModelConfig] = Field(
        default_factory=dict, description="label -> architecture: a grid axis, instead of `model`"
    )
    train: TrainConfig = TrainConfig()
    finetune: TrainConfig = TrainConfig(lr=0.01)
    regimes: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"clean": {}})
    pruning: dict[str, PruningConfig] = Field(default_factory=dict)
    evaluation: EvaluationConfig = EvaluationConfig()
    table1: Table1Config = Table1Config()
    tables: dict[str, PaperTable] = Field(default_factory=dict, description="comparison tables in a paper's layout")
    seeds: list[int] = Field(default_factory=lambda: [0])
    claims: list[Claim] = Field(default_factory=list, description="the paper's central claims (report --claims)")
    budgets: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _own_data(cls, data):
        # the study's own data is registered as a dataset named after its source
        if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
            return data
        d = data["data"]
        given = {k: d[k] for k in ("folder", "npz", "import", "import_") if d.get(k) is not None}
        if not given:
            return data
        if len(given) > 1:
            raise ValueError(f"data gives {' and '.join(given)}; give one source of images")
        ((kind, value),) = given.items()
        if not isinstance(value, str) or not value:
            raise ValueError(f"data.{kind} must be a path or import string")
        from robustprune.data.user import register_source

        name = register_source(kind.rstrip("_"), value, d.get("image_size"), d.get("kwargs") or None)
        if data.get("dataset") not in (None, "mnist", name):
            raise ValueError(f"give either dataset ('{data['dataset']}') or data.{kind.rstrip('_')}, not both")
        return {**data, "dataset": name}

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        # The name becomes a folder under runs/: a path ('../x', '/abs/x') or '' would write elsewhere.
        if not NAME.fullmatch(v):
            raise ValueError(
                f"{excerpt(repr(v))} is a label, not a path: use 1 to 100 letters, digits, '-', '_' or '.', "
                "starting with a letter or digit (e.g. mnist_pruning)"
            )
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if not v:
            raise ValueError("needs at least one seed")
        for seed in v:
            check_seed(seed)
        no_repeats(v)
        return v

    @field_validator("regimes")
    @classmethod
    def _regimes(cls, v):
        if not v:
            raise ValueError("needs at least one training regime")
        return v

    @model_validator(mode="after")
    def _claims_name_cells(self):
        # A claim that names no setting of the study would only ever read "not run": say so at load time.
        for i, claim in enumerate(self.claims):
            for side in ("a", "b"):
                for arm in claim.arms(side):
                    where = f"claims[{i}] ('{claim.name}'), arm {side}"
                    for entry in arm.prunings():
                        if entry != "dense" and entry not in self.pruning:
                            known = ", ".join(["dense", *self.pruning])
                            raise ValueError(f"{where} names pruning '{entry}', not an entry of this study ({known})")
                    if arm.regime is not None and arm.regime not in self.regimes:
                        raise ValueError(
                            f"{where} names regime '{arm.regime}'; the study has {', '.join(self.regimes)}"
                        )
                    if arm.regime is None and len(self.regimes) > 1:
                        several = ", ".join(self.regimes)
                        raise ValueError(f"{where} needs a regime: the study has several ({several})")
        return self

    @model_validator(mode="after")
    def _names_exist(self):
        # Unknown names are caught here, with the list of known ones, before anything runs.
        from robustprune.data import DATASETS, REGIMES
        from robustprune.models import MODELS, meta_model
        from robustprune.pruning import PRUNING_METHODS

        DATASETS.get(self.dataset)
        if self.models and self.model != ModelConfig():  # (a dumped and reloaded study repeats the default)
            raise ValueError("give either 'model' (one architecture) or 'models' (several), not both")
        configs = [m.model_dump_json() for m in self.models.values()]
        if len(set(configs)) != len(configs):
            raise ValueError("two entries of 'models' are the same architecture with the same args; remove one")
        for label, model in self.model_items():
            if label is not None and not label.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"model label '{label}' may hold only letters, digits, '_' and '-'")
            MODELS.get(model.name)
            who = f"model '{model.name}'" + (f" (models.{label})" if label else "")
            try:  # unknown or ill-typed args and the model's own checks, on the meta device (no memory used)
                meta_model(model.name, **model.args)
            except TypeError as e:
                raise ValueError(f"{who} does not accept args {excerpt(model.args)} ({excerpt(str(e), 160)})") from None
            except UserError as e:
                raise ValueError(f"{who} does not accept args {excerpt(model.args)} ({e})") from None
            except Exception:
                pass  # (may depend on the image size: checked on the dataset's images before a run writes anything)
            if model.train:
                _changes_valid(lambda model=model: self.model_train(model), f"model '{label or model.name}'.train")
            if model.seeds is not None and not set(model.seeds) & set(self.seeds):
                raise ValueError(
                    f"model '{label or model.name}' runs seeds {model.seeds}, none of the study's "
                    f"seeds {self.seeds}; list some of those"
                )
            if model.weights is not None:
                from robustprune.files import check_regular_file

                check_regular_file(model.weights, "model.weights file", "give the path of a state dict file")
            if model.weights is not None and not Path(model.weights).is_file():
                raise ValueError(
                    f"model.weights file {model.weights} does not exist; give the path of a state dict "
                    f"saved with torch.save(model.state_dict(), path)"
                )
        for name, params in self.regimes.items():
            _check_params(REGIMES.get(name).Params, params, f"regimes.{name}")
        for label, p in self.pruning.items():
            method = PRUNING_METHODS.get(p.method)
            _check_params(method.Params, p.params, f"pruning.{label}.params")
            try:
                method().validate(method.Params(**p.params))
                for sparsity in p.sparsities:
                    method().validate_sparsity(method.Params(**p.params), sparsity)
            except ValueError as e:
                raise ValueError(f"pruning.{label}.params: {e}") from None
            if p.finetune:
                if "epochs" in p.finetune:
                    raise ValueError(
                        f"pruning '{label}': fine-tuning epochs come from finetune_epochs; remove 'finetune.epochs'"
                    )
                _changes_valid(lambda label=label: self.entry_finetune(label), f"pruning '{label}'.finetune")
            if p.models is not None:
                if not self.models:
                    raise ValueError(f"pruning '{label}' lists models, but the study has one model; remove 'models'")
                if not p.models:
                    raise ValueError(f"pruning '{label}': models lists no architecture; remove it or name some")
                for m in p.models:
                    if m not in self.models:
                        raise ValueError(
                            f"pruning '{label}' names model '{m}', which is not a label of 'models' "
                            f"({', '.join(self.models)})"
                        )
            if getattr(method.Params(**p.params), "target", None) in ("blocks", "both"):
                self._check_blocks(label, p.models)
            if not method.iterative and not p.sparsities:
                raise ValueError(f"pruning '{label}' lists no sparsities")
            if method.iterative and p.adjust != ["finetune"]:
                raise ValueError(f"pruning '{label}': {p.method} retrains itself; remove 'adjust'")
            if not method.adjustable and p.adjust != ["finetune"]:
                raise ValueError(
                    f"pruning '{label}': {p.method} supports only adjust: [finetune]; use method "
                    f"'structured' (criterion l1) for Scratch-E/B and winning tickets"
                )
            if getattr(method.Params(**p.params), "rounds", 1) > 1 and p.adjust != ["finetune"]:
                raise ValueError(
                    f"pruning '{label}': iterative pruning (rounds > 1) fine-tunes after every round, "
                    f"so it takes only adjust: [finetune]; put Scratch-E/B and winning tickets in a "
                    f"one-shot entry"
                )
            if "winning_ticket" in p.adjust and any(m.weights for _, m in self.model_items()):
                raise ValueError(
                    f"pruning '{label}': a winning ticket rewinds to weights saved while training the "
                    f"dense model, and model.weights loads one instead; drop one of the two"
                )
            for model_label, model in self.model_items() if "winning_ticket" in p.adjust else []:
                epochs = self.model_train(model).epochs
                if (p.models is None or model_label in p.models) and p.rewind_at(epochs) > epochs:
                    of = f" of model '{model_label}'" if model_label else ""
                    raise ValueError(
                        f"pruning '{label}': rewind_epoch {p.rewind_at(epochs)} is after the last of the "
                        f"{epochs} training epochs{of}; use 0 to {epochs}, or rewind_fraction"
                    )
        penalty = self.train.magnitude_penalty
        if penalty is not None and penalty.threshold_from_reverse is not None:
            raise ValueError(
                "train.magnitude_penalty.threshold_from_reverse takes tau from the trained dense model, "
                "so it works only when fine-tuning (finetune, or a pruning entry's finetune); give "
                "train a threshold instead"
            )
        if self.evaluation.transfer:
            for m in self.evaluation.transfer.models:
                self._check_selector(m)
        for col, (regime, _metric) in self.table1.columns.items():
            if regime not in self.regimes:
                raise ValueError(f"table1 column '{col}' names regime '{regime}', which the study does not train")
        for row in self.table1.rows:
            if row.pruning not in self.pruning:
                raise ValueError(
                    f"table1 row '{row.label}' names pruning '{row.pruning}', which the study does not run"
                )
            entry = self.pruning[row.pruning]
            if not PRUNING_METHODS.get(entry.method).iterative and row.sparsity not in entry.sparsities:
                raise ValueError(
                    f"table1 row '{row.label}' asks for sparsity {row.sparsity}, but pruning "
                    f"'{row.pruning}' runs {entry.sparsities}"
                )
        for name, t in self.tables.items():
            self._check_paper_table(name, t)
        return self

    def _check_paper_table(self, name: str, t: PaperTable) -> None:
        if not t.rows or not t.columns:
            raise ValueError(f"tables.{name} needs at least one row and one column")
        for label, ref in t.rows.items():
            entry, _, at = ref.partition("@")
            if entry != "dense" and entry not in self.pruning:
                raise ValueError(
                    f"tables.{name} row '{label}' names pruning '{entry}', which the study does not "
                    f"run ({', '.join(self.pruning) or 'none'})"
                )
            if at and (entry == "dense" or not _is_float(at) or float(at) not in self.pruning[entry].sparsities):
                runs = "" if entry == "dense" else f" (it runs {self.pruning[entry].sparsities})"
                raise ValueError(f"tables.{name} row '{label}': '{ref}' is not a sparsity of '{entry}'{runs}")
        for label, source in t.columns.items():
            if source == "clean" or source.startswith("metric:") and len(source) > len("metric:"):
                continue
            attack, _, at = source.partition("@")
            if attack not in self.evaluation.attacks:
                raise ValueError(
                    f"tables.{name} column '{label}' names '{source}'; use 'clean', 'metric:<name>' or "
                    f"an entry of evaluation.attacks ({', '.join(self.evaluation.attacks) or 'none'})"
                )
            if at and (not _is_float(at) or float(at) not in self.evaluation.attacks[attack].eps):
                raise ValueError(
                    f"tables.{name} column '{label}': '{source}' is not an eps of attack '{attack}' "
                    f"({self.evaluation.attacks[attack].eps})"
                )
        for m in t.models or []:
            if m not in self.models:
                raise ValueError(
                    f"tables.{name} names model '{m}', which is not a label of 'models' "
                    f"({', '.join(self.models) or 'none: the study has one model'})"
                )
        if t.regime not in self.regimes:
            raise ValueError(f"tables.{name} names regime '{t.regime}', which the study does not train")

    def _check_blocks(self, label: str, only: list[str] | None) -> None:
        """Layer pruning needs residual blocks with identity shortcuts in every architecture it prunes."""
        from robustprune.models import meta_model
        from robustprune.models.blocks import residual_blocks

        for model_label, model in self.model_items():
            if only is not None and model_label not in only:
                continue
            try:
                blocks = residual_blocks(meta_model(model.name, **model.args))
            except Exception:  # (args that fail are refused on the dataset's images, before any write)
                continue
            if not any(b.removable for _, b in blocks):
                hint = " or list the other architectures under the entry's 'models'" if self.models else ""
                raise ValueError(
                    f"pruning '{label}' removes residual blocks, but model '{model.name}' has no "
                    f"residual block with an identity shortcut; use target: filters{hint}"
                )

    def entry_finetune(self, label: str) -> TrainConfig:
        """The study's finetune settings with a pruning entry's own changes applied."""
        changes = self.pruning[label].finetune
        return TrainConfig(**(self.finetune.model_dump() | changes)) if changes else self.finetune

    def model_train(self, model: ModelConfig) -> TrainConfig:
        """The dense training of one architecture: the study's train settings and the model's changes."""
        return TrainConfig(**(self.train.model_dump() | model.train)) if model.train else self.train

    def model_items(self) -> list[tuple[str | None, ModelConfig]]:
        """The architectures of the grid: (None, model) for a one-model study, else (label, config)."""
        return list(self.models.items()) if self.models else [(None, self.model)]

    def _check_selector(self, m: ModelSelector) -> None:
        from robustprune.pruning import PRUNING_METHODS

        where = f"evaluation.transfer.models entry {m.model_dump(exclude_none=True)}"
        if m.model is not None and m.model not in self.models:
            raise ValueError(
                f"{where} names model '{m.model}', which is not a label of 'models' "
                f"({', '.join(self.models) or 'the study has one model; leave model out'})"
            )
        if m.pruning == "dense":
            if (m.sparsity, m.finetune_epochs, m.round, m.iteration) != (None, None, None, None):
                raise ValueError(f"{where}: the dense model takes no sparsity, finetune_epochs or round")
            return
        if m.pruning not in self.pruning:
            raise ValueError(
                f"{where} names pruning '{m.pruning}', which the study does not run "
                f"(known: dense, {', '.join(self.pruning)})"
            )
        entry = self.pruning[m.pruning]
        if m.model is not None and entry.models is not None and m.model not in entry.models:
            raise ValueError(
                f"{where} names model '{m.model}', which pruning '{m.pruning}' does not prune "
                f"(its models: {', '.join(entry.models)})"
            )
        method = PRUNING_METHODS.get(entry.method)
        if method.iterative:
            rounds = method.Params(**entry.params).rounds
            if m.round is None or not 1 <= m.round <= rounds:
                raise ValueError(f"{where} needs a round between 1 and {rounds}")
            return
        if m.sparsity not in entry.sparsities:
            raise ValueError(f"{where} needs a sparsity the study runs ({entry.sparsities})")
        rounds = getattr(method.Params(**entry.params), "rounds", 1)
        if rounds > 1 and m.adjust is None and (m.iteration is None or not 1 <= m.iteration <= rounds):
            raise ValueError(f"{where} needs an iteration between 1 and {rounds} (the entry prunes iteratively)")
        if (rounds == 1 or m.adjust is not None) and m.iteration is not None:
            raise ValueError(f"{where}: iteration applies only to an entry with rounds > 1; remove it")
        if m.finetune_epochs not in entry.finetune_epochs:
            raise ValueError(f"{where} needs finetune_epochs the study runs ({entry.finetune_epochs})")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    """Set tree[a][b][c] for key 'a.b.c'. A part '*' stands for every entry of that section, so
    'pruning.*.finetune_epochs' sets the fine-tuning of every pruning entry at once."""
    _set_parts(tree, key.split("."), key, value, source)


def _set_parts(node: dict, parts: list[str], key: str, value: Any, source: str) -> None:
    head, rest = parts[0], parts[1:]
    if not rest:
        if head == "*":
            raise UserError(f"{source}: '{key}' ends in '*'; name the setting to change after it")
        node[head] = value
        return
    if head == "*":
        if not node:
            raise UserError(f"{source}: '{key}' has '*' over an empty section; list entries first")
        children = list(node.values())
    else:
        if not isinstance(node.get(head, {}), dict):
            raise UserError(f"{source}: cannot set '{key}' because '{head}' is not a section; check the key")
        children = [node.setdefault(head, {})]
    for child in children:
        if not isinstance(child, dict):
            raise UserError(f"{source}: cannot set '{key}': '*' covers an entry that is not a section")
        _set_parts(child, rest, key, value, source)


def parse_set(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE, VALUE read as YAML (so 3, 0.5, [1, 2] and true have their types)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set '{excerpt(item)}' is not KEY=VALUE; write e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise UserError(f"--set {excerpt(item)} has no key; write --set KEY=VALUE, e.g. --set train.epochs=3")
        try:
            out[key.strip()] = load_yaml(raw)
        except StudyYAMLError as e:
            raise UserError(f"--set {excerpt(key)}: {e}") from None
        except yaml.YAMLError:
            raise UserError(
                f"--set {excerpt(key)}: the value '{excerpt(raw)}' is not valid YAML; quote it or fix its syntax"
            ) from None
    return out


def describe_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    where = excerpt(".".join(str(p) for p in e["loc"]))
    # Messages quote values only as excerpts; this bounds any that does not (a sentence, not a dump).
    msg = excerpt(e["msg"].removeprefix("Value error, "), 400)
    if not where:
        return f"{source}: {msg}; fix the study file"
    if e["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'; remove it or check its spelling against the documented keys"
    if e["type"] == "missing":
        return f"{source}: '{where}' is required; add it"
    return f"{source}: '{where}': {msg}; fix this value"


def load_study(
    path: str | Path, budget: str | None = "full", seeds: int | None = None, overrides: list[str] | None = None
) -> StudyConfig:
    path = Path(path)
    from robustprune.files import check_regular_file

    check_regular_file(path, "study file", "give the path of a YAML study file")  # a FIFO would block the read
    try:
        text = read_study_text(path)
    except StudyYAMLError as e:
        raise UserError(f"study file {path} {e}") from None
    except FileNotFoundError:
        raise UserError(f"study file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read study file {path} ({e}); check the file") from None
    try:
        raw = load_yaml(text)
    except StudyYAMLError as e:
        raise UserError(f"study file {path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"study file {path} is not valid YAML{where}; fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"study file {path} must be a YAML mapping of settings (name:, train:, ...)")
    return resolve_study(raw, str(path), budget, seeds, overrides)


REMOVABLE = ("pruning", "tables", "models", "regimes")  # sections whose entries `entry: null` removes


def resolve_study(
    raw: dict, source: str, budget: str | None = "full", seeds: int | None = None, overrides: list[str] | None = None
) -> StudyConfig:
    tree = copy.deepcopy(raw)
    budgets = tree.get("budgets") or {}
    if not isinstance(budgets, dict):
        raise UserError(f"{source}: 'budgets' must be a mapping of budget names to overrides")
    # 'full' is the study as written; any other budget must be listed in the file.
    if budget and not (budget == "full" and "full" not in budgets):
        if budget not in budgets:
            known = ", ".join(sorted(set(budgets) | {"full"}))
            raise UserError(f"{source} has no budget '{budget}'; known budgets: {known}")
        for key, value in (budgets[budget] or {}).items():
            _set_dotted(tree, key, value, f"{source}, budget '{budget}'")
    for key, value in parse_set(overrides or []).items():
        _set_dotted(tree, key, value, "--set")
    if seeds is not None:
        if not 1 <= seeds <= MAX_SEEDS:  # (before the list of seeds is made: --seeds 10**12 would fill memory)
            what = "at least 1" if seeds < 1 else f"at most {MAX_SEEDS}"
            raise UserError(f"--seeds must be {what}, got {excerpt(seeds)}")
        tree["seeds"] = list(range(seeds))
    for section in REMOVABLE:  # a budget removes an entry by setting it to null
        if isinstance(tree.get(section), dict):
            tree[section] = {k: v for k, v in tree[section].items() if v is not None}
    try:
        return StudyConfig(**tree)
    except ValidationError as e:
        raise UserError(describe_validation_error(e, source)) from None
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
