"""One fast training loop: the whole dataset is a tensor on the device, batches are index slices,
one-cycle learning rate, optional masks that keep pruned weights at zero."""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from robustprune.data.augment import BATCH_TRANSFORMS, crop_flip
from robustprune.device import use_bf16
from robustprune.errors import UserError
from robustprune.tensors import to_float  # (robustprune.train.to_float stays a public path)

# The augmentation generator's seed is the training seed plus this (random choices never share a stream).
AUGMENT_SEED_OFFSET = 1 << 32
# Bounds that keep a typo (epochs: 1e9 written as an int, a batch of 10**12) from hanging a run or exhausting memory.
MAX_EPOCHS = 10_000
MAX_BATCH = 1 << 20


class AdversarialTraining(BaseModel):
    """Adversarial (fine-)tuning as MRPF does it (Bai et al. Eq. 12): each batch of clean images gets
    adversarial versions of a `ratio` share of its images appended, crafted on the current model
    with a registry attack, so an epoch trains on D plus ratio x AE' regenerated as the model moves."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    attack: str = Field("fgsm", description="a registered attack (fgsm, pgd, ni_fgsm, vmi_fgsm, ...)")
    eps: float = Field(2 / 255, ge=0, le=1, description="L-inf radius, pixel scale")
    ratio: float = Field(0.2, gt=0, le=1, description="adversarial images per clean image (r_AT)")
    params: dict = Field(default_factory=dict, description="the attack's other arguments")

    @model_validator(mode="after")
    def _builds(self):
        self.build()  # an unknown attack or a bad argument is refused when the config is read
        return self

    def build(self):
        import inspect

        from robustprune.attacks.registry import ATTACKS, build_attack

        params = dict(self.params)
        # training wants the loss maximiser (Madry's last PGD iterate), not an evaluation attack's first
        # point over the boundary; an explicit early_stop in params still wins
        if "early_stop" in inspect.signature(ATTACKS.get(self.attack)).parameters:
            params.setdefault("early_stop", False)
        return build_attack(self.attack, self.eps, params)


class MagnitudePenalty(BaseModel):
    """The high-magnitude penalty of the reverse-pruning paper (Eq. 4): lambda * sum over the conv and
    linear weights of max(|w| - tau, 0)^2, added to the loss. It is zero for weights inside [-tau, tau]
    and pulls the larger ones back towards tau with gradient 2 * lambda * (|w| - tau) * sign(w)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    weight: float = Field(gt=0, description="lambda, the scale of the penalty")
    threshold: float | None = Field(None, gt=0, description="tau, explicitly")
    threshold_from_reverse: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="tau from the dense model, as the paper: the largest |w| that a global "
        "reverse pruning of this share of the dense model's weights keeps (fine-tuning only)",
    )

    @model_validator(mode="after")
    def _one_threshold(self):
        if (self.threshold is None) == (self.threshold_from_reverse is None):
            raise ValueError("give exactly one of threshold (tau) and threshold_from_reverse (a reverse-pruning share)")
        return self


def magnitude_penalty(weights: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """sum over all weights of max(|w| - threshold, 0)^2 (without lambda)."""
    return sum((F.relu(w.abs() - threshold).pow(2).sum() for w in weights), torch.zeros((), device=weights[0].device))


class TrainConfig(BaseModel):
    """How a model is trained (dense training, fine-tuning and lottery-ticket retraining)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    epochs: int = Field(2, ge=0, le=MAX_EPOCHS)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "step", "constant"] = "onecycle"
    warmup: float = Field(0.2, ge=0, le=1, description="share of steps spent warming up (onecycle)")
    min_lr: float = Field(0.0, ge=0, description="the learning rate cosine decays to (MRPF: 1e-4)")
    step_every: float = Field(
        1 / 3,
        gt=0,
        le=1,
        description="step schedule: multiply the lr by step_gamma after every such share of the steps",
    )
    step_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: the factor (MRPF: 10 % of the previous)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    augment: Literal["none", "crop_flip"] = Field("none", description="per-image augmentation of each batch")
    crop_padding: int = Field(4, ge=0, le=256, description="zero padding of the random crop (crop_flip)")
    mix: Literal["none", "mixup", "cutout", "cutmix"] = Field(
        "none", description="a batch transform of robustprune.data.augment"
    )
    mix_alpha: float = Field(1.0, gt=0, description="Beta(alpha, alpha) of mixup and cutmix")
    cutout_size: int = Field(16, ge=1, description="side of the cutout square in pixels")
    dynamics: bool = Field(
        False,
        description="record gradient confusion and layer rotation after every epoch "
        "(Jordão & Pedrini Fig. 2; 8 fixed batches of 64 training images)",
    )
    adversarial: AdversarialTraining | None = Field(None, description="append adversarial examples to every batch")
    magnitude_penalty: MagnitudePenalty | None = Field(
        None, description="penalise weights above a threshold (reverse-pruning paper, Eq. 4)"
    )


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


def make_schedule(opt, cfg: TrainConfig, total_steps: int):
    if cfg.schedule == "onecycle" and total_steps >= 4:  # shorter runs have no room for a warm-up
        pct = min(max(cfg.warmup, 2.0 / total_steps), 0.5)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=pct, anneal_strategy="linear"
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.min_lr)
    if cfg.schedule == "step":
        every = max(1, round(cfg.step_every * total_steps))
        return torch.optim.lr_scheduler.StepLR(opt, step_size=every, gamma=cfg.step_gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> None:
    if not masks:
        return
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    masks: dict[str, torch.Tensor] | None = None,
    on_step: Callable[[int, int, int, float], None] | None = None,
    on_epoch_end: Callable[[int, nn.Module], dict | None] | None = None,
) -> list[dict]:
    """Train in place. x: uint8 or float images on the model's device; y: labels.
    on_step(epoch, step, steps_per_epoch, loss) reports progress; on_epoch_end(epoch, model) runs
    after each epoch (1-based; e.g. to save rewind weights or measure training dynamics) and may
    return metrics for that epoch's history entry. Returns one dict per epoch."""
    history: list[dict] = []
    if cfg.epochs == 0 or len(x) == 0:
        return history
    device = next(model.parameters()).device
    model.to(memory_format=torch.channels_last)
    masks = {k: m.to(device) for k, m in (masks or {}).items()}
    apply_masks(model, masks)
    opt = make_optimizer(model, cfg)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    sched = make_schedule(opt, cfg, cfg.epochs * steps_per_epoch)
    g = torch.Generator(device="cpu").manual_seed(seed)
    # augmentation draws from its own stream, so the batch order does not depend on it
    aug_g = torch.Generator(device="cpu").manual_seed(seed + AUGMENT_SEED_OFFSET)
    mix = BATCH_TRANSFORMS.get(cfg.mix) if cfg.mix != "none" else None
    adversary = cfg.adversarial.build() if cfg.adversarial else None
    penalty = cfg.magnitude_penalty
    if penalty is not None:
        if penalty.threshold is None:
            raise UserError(
                "magnitude_penalty.threshold_from_reverse needs the dense model: it is resolved when a "
                "study fine-tunes a pruned model; give threshold (tau) to train from scratch"
            )
        from robustprune.pruning.unstructured import prunable_weights

        penalised = list(prunable_weights(model).values())
    bf16 = use_bf16(cfg.precision, device)
    probe = None
    if cfg.dynamics:  # fixed probe batches and the weights this training starts from
        from robustprune.metrics.dynamics import EpochDynamics

        probe = EpochDynamics(x, y, model, seed=seed)
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g).to(device)
        loss_sum, seen = torch.zeros((), device=device), 0
        correct = torch.zeros((), device=device, dtype=torch.long if mix is None else torch.float64)  # mixed: weighted
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            xb, yb = x[idx], y[idx]
            if cfg.augment == "crop_flip":
                xb = crop_flip(xb, aug_g, cfg.crop_padding)
            xb = to_float(xb)
            if adversary is not None:  # the first ratio x B images of the (shuffled) batch, attacked now
                n_adv = int(round(cfg.adversarial.ratio * len(idx)))
                if n_adv:
                    xb = torch.cat([xb, adversary(model, xb[:n_adv], yb[:n_adv])]).contiguous(
                        memory_format=torch.channels_last
                    )
                    yb = torch.cat([yb, yb[:n_adv]])
            yb2, lam = yb, 1.0
            if mix is not None:
                xb, yb, yb2, lam = mix(xb, yb, aug_g, alpha=cfg.mix_alpha, size=cfg.cutout_size)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                if lam != 1.0:  # mixed labels: lam * CE(y_a) + (1 - lam) * CE(y_b)
                    loss = lam * loss + (1.0 - lam) * F.cross_entropy(
                        logits.float(), yb2, label_smoothing=cfg.label_smoothing
                    )
            if penalty is not None:  # on the fp32 weights, outside autocast
                loss = loss + penalty.weight * magnitude_penalty(penalised, penalty.threshold)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            apply_masks(model, masks)
            loss_sum += loss.detach() * len(yb)
            seen += len(yb)  # clean images plus the adversarial ones appended to them
            pred = logits.detach().argmax(1)
            correct += (
                (pred == yb).sum() if lam == 1.0 else lam * (pred == yb).sum() + (1.0 - lam) * (pred == yb2).sum()
            )
            if on_step is not None and (step % 20 == 0 or step == steps_per_epoch - 1):
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(f"loss became {value} in epoch {epoch + 1}, step {step + 1}")
                on_step(epoch, step + 1, steps_per_epoch, value)
        mean_loss = float(loss_sum) / seen
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss} in epoch {epoch + 1}")
        entry = {"epoch": epoch + 1, "loss": mean_loss, "train_acc": float(correct) / seen}
        if probe is not None:
            entry.update(probe(epoch + 1, model))
            model.train()
        if on_epoch_end is not None:
            entry.update(on_epoch_end(epoch + 1, model) or {})
            model.train()
        history.append(entry)
    model.eval()
    return history


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Predicted labels for uint8 or float images, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(to_float(x[i : i + batch_size].to(device))).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Which images the model classifies correctly (bool, on the CPU)."""
    return predict(model, x, batch_size).cpu() == y.cpu()


def accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 2000,
    record: dict | None = None,
    name: str | None = None,
) -> float:
    """Share of images classified correctly; with `record`, record[name] keeps the per-image result
    (paired significance tests compare two models on the same images)."""
    if len(x) == 0:
        return float("nan")
    hits = correct(model, x, y, batch_size)
    if record is not None:
        record[name] = hits
    return int(hits.sum()) / len(x)  # exact, not a float32 mean
