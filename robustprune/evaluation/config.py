"""What an evaluation measures (evaluation.* of a study file, and rp.evaluate's settings): the
attacks and their strengths, corruptions, transfer, security curves and Algorithm 2. Here rather than
in the study schema so that rp.evaluate needs nothing from robustprune.study (which builds on the
public calls); the schema imports these classes and still exposes them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from robustprune.errors import UserError, closest
from robustprune.settings import Seed, Strict, no_repeats
from robustprune.train import MAX_BATCH


class AttackEntry(Strict):
    """One white-box attack of the registry at a list of strengths (a severity sweep)."""

    attack: str | None = Field(None, description="registry name; defaults to the entry's label")
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's other arguments")
    eps: list[float] = Field(description="radii in the attack's norm (L-inf by default), pixel scale [0, 1]")
    subset: int | None = Field(
        None,
        ge=1,
        description="attack only the first N of the attacked images (an "
        "expensive attack such as AutoAttack; None: all of them)",
    )

    def name(self, label: str) -> str:
        """The registry name of the attack this entry (listed under `label`) runs."""
        return self.attack or label

    def build(self, label: str, eps: float):
        """The attack object at one strength: attack(model, x, y) -> x_adv."""
        from robustprune.attacks.registry import ATTACKS

        return ATTACKS.get(self.name(label))(eps=eps, **self.params)

    @field_validator("eps")
    @classmethod
    def _eps(cls, v, info: ValidationInfo):
        if not v:
            raise ValueError("needs at least one eps")
        no_repeats(v)
        l2 = str((info.data.get("params") or {}).get("norm", "Linf")).lower() == "l2"
        for e in v:
            if l2 and not 0.0 <= e < float("inf"):
                raise ValueError(f"eps {e} must be a finite L2 radius >= 0")
            if not l2 and not 0.0 <= e <= 1.0:
                raise ValueError(
                    f"eps {e} is outside [0, 1] (images are in [0, 1]; an L2 radius needs params: {{norm: L2}})"
                )
        return v


class CorruptionsConfig(Strict):
    """Common corruptions: generated on the test images (seeded), or the official CIFAR-10-C files."""

    types: list[str] | Literal["all"] = "all"
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])
    seed: Seed = 0
    source: Literal["generated", "cifar10c"] = "generated"
    cifar10c_dir: str | None = Field(None, description="folder of the CIFAR-10-C .npy files (source: cifar10c)")

    @field_validator("severities")
    @classmethod
    def _severities(cls, v):
        if not v:
            raise ValueError("needs at least one severity")
        no_repeats(v)
        for s in v:
            if s not in (1, 2, 3, 4, 5):
                raise ValueError(f"severity {s} is not one of 1, 2, 3, 4, 5")
        return v

    @model_validator(mode="after")
    def _source(self):
        if self.source == "cifar10c" and not self.cifar10c_dir:
            raise ValueError("source 'cifar10c' needs cifar10c_dir, the folder holding the CIFAR-10-C .npy files")
        return self


class ModelSelector(Strict):
    """One model of each (regime, seed): 'dense', a one-shot setting, or a lottery round; with
    several architectures (`models:`), `model` names the architecture (default: every one)."""

    pruning: str
    model: str | None = None
    adjust: str | None = Field(None, description="scratch_e, scratch_b or winning_ticket (default: fine-tuning)")
    sparsity: float | None = None
    finetune_epochs: int | None = None
    round: int | None = None
    iteration: int | None = Field(None, description="an iterative structured entry's iteration (rounds > 1)")

    def matches(self, axes: dict) -> bool:
        """Whether a cell with these axes is the model this selector names."""
        if self.pruning != axes["pruning"] or (self.model is not None and self.model != axes.get("model")):
            return False
        if self.adjust != axes.get("adjust") or self.iteration != axes.get("iteration"):
            return False
        if self.pruning == "dense":
            return True
        if axes["round"] is not None:
            return self.round == axes["round"]
        return self.sparsity == axes["sparsity"] and self.finetune_epochs == axes["finetune_epochs"]


class TransferConfig(Strict):
    """Adversarial examples crafted on each listed model, evaluated on each other listed model."""

    attack: str = Field(description="label of an entry of evaluation.attacks")
    eps: float | None = Field(None, description="one of that entry's eps (default: its first)")
    models: list[ModelSelector]

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v):
        return [{"pruning": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v

    @field_validator("models")
    @classmethod
    def _two(cls, v):
        if len(v) < 2:
            raise ValueError("needs at least two models (a source and a target)")
        no_repeats([m.model_dump_json() for m in v])
        return v


class SingleElementConfig(Strict):
    """Algorithm 2 of Jordão & Pedrini on every dense model: remove each filter (or residual block)
    alone, no adjustment, and count the removals that raise robustness (each attack at its report
    eps) at a clean-accuracy loss of at most t p.p."""

    kind: Literal["filters", "blocks"] = "filters"
    max_elements: int | None = Field(64, ge=1, description="a seeded sample of this many elements (None: all)")
    images: int = Field(500, ge=1, description="evaluate each removal on the first N test images")
    tolerances: list[float] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5], description="p.p.")
    seed: Seed = 0
    attacks: list[str] | None = Field(
        None,
        description="labels of evaluation.attacks to count (default: every "
        "attack without a subset of its own, such as AutoAttack; "
        "each removal costs one run of each)",
    )


class SecurityConfig(Strict):
    """A security curve per model: FMN (Pintor et al. 2021) gives every attacked image its smallest
    breaking perturbation, so one run gives robust accuracy at every eps of the grid."""

    norm: Literal["Linf", "L2"] = "Linf"
    eps: list[float] = Field(description="radii at which the curve is stored (pixel scale [0, 1] for Linf)")
    steps: int = Field(100, ge=1, le=100_000, description="FMN iterations")
    subset: int | None = Field(None, ge=1, description="only the first N of the attacked images (None: all)")
    seed: Seed = 0

    @field_validator("eps")
    @classmethod
    def _grid(cls, v, info: ValidationInfo):
        if not v:
            raise ValueError("needs at least one eps")
        no_repeats(v)
        for e in v:
            if not 0.0 <= e < float("inf") or (info.data.get("norm") == "Linf" and e > 1.0):
                raise ValueError(f"eps {e} must be >= 0 (and at most 1 for Linf)")
        return sorted(v)


class EvaluationConfig(Strict):
    batch_size: int = Field(500, ge=1, le=MAX_BATCH)
    attack_subset: int | None = Field(1000, ge=1, description="attack the first N test images (None: all)")
    shift_subset: int | None = Field(2000, ge=1, description="occlude / corrupt the first N test images (None: all)")
    attacks: dict[str, AttackEntry] = Field(default_factory=lambda: {"fgsm": AttackEntry(eps=[0.1])})
    occlusion: list[int] = Field(default_factory=list, description="sides of the centre square, pixels")
    corruptions: CorruptionsConfig | None = None
    transfer: TransferConfig | None = None
    security: SecurityConfig | None = Field(None, description="a security curve per model (FMN)")
    masking_tolerance: float = Field(
        0.005, ge=0.0, le=1.0, description="accuracy gap (fraction) a masking check allows"
    )
    report_eps: float | None = Field(None, ge=0.0, le=1.0, description="eps shown in summary tables")
    single_element: SingleElementConfig | None = None
    latency_batch: int | None = Field(
        None,
        ge=1,
        le=4096,  # (the batch is allocated at once)
        description="measure forward latency on a batch this big "
        "(wall-clock, so not reproducible bit for bit; None: off)",
    )

    @field_validator("occlusion")
    @classmethod
    def _sizes(cls, v):
        no_repeats(v)
        for s in v:
            if s < 1:
                raise ValueError(f"occlusion size {s} must be at least 1 pixel")
        return v

    @model_validator(mode="after")
    def _attacks(self):
        from robustprune.attacks.corruptions import CORRUPTIONS
        from robustprune.attacks.registry import build_attack

        for label, entry in self.attacks.items():
            if not label.replace("_", "").isalnum():
                raise ValueError(f"attack label '{label}' may hold only letters, digits and '_'")
            if label == "worst":
                raise ValueError(
                    "attack label 'worst' is reserved for the per-image worst case over the attacks; "
                    "choose another label"
                )
            for eps in entry.eps:  # the attack checks its own arguments (steps >= 1, ...)
                build_attack(entry.name(label), eps, entry.params, what=label)
        if self.corruptions and self.corruptions.types != "all":
            if not self.corruptions.types:
                raise ValueError("corruptions.types lists no corruption; write 'all' or name some")
            no_repeats(self.corruptions.types)
            for t in self.corruptions.types:
                if t not in CORRUPTIONS:
                    raise UserError(f"unknown corruption '{t}'; {closest(t, CORRUPTIONS)}")
        se = self.single_element
        if se is not None and se.attacks is not None:
            if not se.attacks:
                raise ValueError("single_element.attacks lists no attack; leave it out to use every attack")
            for label in se.attacks:
                if label not in self.attacks:
                    raise ValueError(
                        f"single_element.attacks names '{label}', which is not an entry of "
                        f"evaluation.attacks ({', '.join(self.attacks) or 'none'})"
                    )
        if self.transfer:
            entry = self.attacks.get(self.transfer.attack)
            if entry is None:
                raise ValueError(
                    f"transfer.attack '{self.transfer.attack}' is not an entry of evaluation.attacks "
                    f"({', '.join(self.attacks) or 'none'})"
                )
            if self.transfer.eps is not None and self.transfer.eps not in entry.eps:
                raise ValueError(
                    f"transfer.eps {self.transfer.eps} is not one of attack '{self.transfer.attack}''s eps {entry.eps}"
                )
        return self

    def corruption_types(self) -> list[str]:
        from robustprune.attacks.corruptions import CORRUPTIONS

        c = self.corruptions
        return [] if c is None else list(CORRUPTIONS) if c.types == "all" else list(c.types)

    def shown_eps(self, label: str) -> float:
        """The eps an attack is reported at: report_eps when the attack runs at it, else its first."""
        eps = self.attacks[label].eps
        return self.report_eps if self.report_eps is not None and self.report_eps in eps else eps[0]

    def transfer_eps(self) -> float | None:
        t = self.transfer
        return None if t is None else t.eps if t.eps is not None else self.attacks[t.attack].eps[0]
