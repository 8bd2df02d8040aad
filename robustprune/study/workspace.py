"""Computing one cell of a study: the Workspace reuses every dense model, regime data set and
lottery-ticket round through an on-disk cache, and compute_and_store writes each finished cell to the
store at once. The runner (runner.py) and the parallel executors (executor.py, ray_executor.py) all
call compute_and_store, so it sits below them and imports none of them."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from robustprune import checkpoint
from robustprune.api import CRITERION_IMAGES
from robustprune.attacks.cifar10c import load_cifar10c
from robustprune.attacks.corruptions import corrupt
from robustprune.data import REGIMES, ImageDataset, load_dataset
from robustprune.errors import UserError
from robustprune.evaluation import names
from robustprune.evaluation.names import setting_key
from robustprune.evaluation.suite import evaluate_robustness, first
from robustprune.metrics.latency import measure_latency
from robustprune.metrics.size import layer_widths, size_metrics
from robustprune.metrics.weights import weight_statistics
from robustprune.models import build_model, check_model, to_device
from robustprune.pruning import PRUNING_METHODS
from robustprune.pruning.criteria.replay import Recording, Replay
from robustprune.pruning.methods import MATCHED, Structured
from robustprune.pruning.single_element import improvement_fractions, make_evaluator, single_element_study
from robustprune.pruning.unstructured import (
    apply_masks_,
    global_magnitude_masks,
    prunable_weights,
    reverse_threshold,
    rewind_,
)
from robustprune.study.cells import Cell, config_hash, dump, expand
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store
from robustprune.tensors import to_float
from robustprune.train import TrainConfig, TrainingDiverged, accuracy, train

# Derived seeds keep the random streams of one cell apart (init/shuffle, fine-tuning, regime noise).
FINETUNE_SEED_OFFSET = 1
REGIME_SEED_OFFSET = 7
ADJUST_SEED_OFFSET = 101  # scratch initialisation and retraining after Scratch-E/B or winning ticket
ROUND_SEED_STRIDE = 1000  # fine-tuning after iteration k of iterative pruning: + (k - 1) * this


def dense_training(key: dict) -> TrainConfig:
    """The training settings of a dense key: the study's `train`, with the architecture's own changes."""
    return TrainConfig(**key["train"])


class Progress:
    """What the runner reports; the CLI draws it with rich, tests leave it silent."""

    def plan(self, cells: list[Cell], stored: set[str]) -> None:
        """The study's cells and which are already stored (for time-left estimates)."""

    def cell_started(self, cell: Cell, index: int, total: int) -> None: ...
    def cell_finished(self, cell: Cell, index: int, total: int, seconds: float, status: str) -> None: ...
    def stage(self, text: str, total: int) -> None: ...
    def advance(self, completed: int, info: str = "") -> None: ...
    def worker_event(self, worker: int, kind: str, *args) -> None:
        """A parallel worker's start / stage / advance, relayed by the executor."""


@dataclass
class DenseModel:
    model: torch.nn.Module
    init_state: dict
    history: list
    rewind: dict = None  # epoch -> state dict, for winning tickets


class Workspace:
    """Caches shared by cells: datasets and regime data in memory, trained models on disk."""

    def __init__(
        self,
        study: StudyConfig,
        out_dir: Path,
        data_dir,
        device: torch.device,
        progress: Progress,
        checkpoints: Path | None = None,
    ):
        self.study, self.out_dir, self.data_dir = study, Path(out_dir), data_dir
        self.device, self.progress = device, progress
        # named by the hash of what they depend on, so studies may share one folder (--checkpoints)
        self.ckpt_dir = Path(checkpoints) if checkpoints else self.out_dir / "checkpoints"
        self._base: ImageDataset | None = None
        self._regime_data: dict[str, ImageDataset] = {}
        self._dense: dict[str, DenseModel] = {}
        self._plans: dict[str, dict] = {}  # per pruning setting: MRS and ratios of a method that chose them
        self._all_cells: list[Cell] | None = None

    # ---- data -------------------------------------------------------------------------------
    def base_data(self) -> ImageDataset:
        if self._base is None:
            d = load_dataset(self.study.dataset, self.data_dir)
            self._base = d.subset(self.study.data.train_subset, self.study.data.test_subset)
        return self._base

    def regime_data(self, key: dict) -> ImageDataset:
        h = config_hash({k: key[k] for k in ("dataset", "data", "model", "train", "regime", "seed")})
        if h not in self._regime_data:
            if len(self._regime_data) >= 2:  # keep memory bounded: cells come grouped by regime
                self._regime_data.pop(next(iter(self._regime_data)))
            regime = REGIMES.get(key["regime"]["name"])
            params = regime.Params(**key["regime"]["params"])
            path = self.ckpt_dir / f"data-{h}.pt"
            cached = checkpoint.load(path) if path.exists() else None
            base = self.base_data()
            if cached is not None:
                data = ImageDataset(
                    base.name,
                    cached["x_train"],
                    cached["y_train"],
                    base.x_test,
                    base.y_test,
                    base.num_classes,
                    base.mean,
                    base.std,
                    cached["extra_tests"],
                )
            else:
                data = regime().apply(base, params, key["seed"] + REGIME_SEED_OFFSET, self.source_model(key))
                if data is not base:  # only derived data sets are worth a file
                    checkpoint.save(
                        {"x_train": data.x_train, "y_train": data.y_train, "extra_tests": data.extra_tests}, path
                    )
            # after the regime, so the validation images are drawn like the training images a user has
            self._regime_data[h] = data.hold_out(self.study.data.validation)
        return self._regime_data[h]

    def source_model(self, key: dict) -> Callable[[int], torch.nn.Module]:
        """A separately trained clean model on the same data (what the FGSM data set is crafted on)."""

        def make(seed: int) -> torch.nn.Module:
            clean = {**key, "regime": {"name": "clean", "params": {}}, "seed": seed}
            return self.dense(clean).model

        return make

    # ---- models -------------------------------------------------------------------------------
    def new_model(self, key: dict) -> torch.nn.Module:
        """A freshly initialised model of the architecture in a dense key (the global torch seed
        decides the weights)."""
        base = self.base_data()
        return build_model(
            key["model"]["name"],
            num_classes=base.num_classes,
            image_shape=base.image_shape,
            mean=base.mean,
            std=base.std,
            **key["model"]["args"],
        )

    def example_input(self) -> torch.Tensor:
        return torch.zeros((1, *self.base_data().image_shape), device=self.device)

    def _train(
        self, model, data: ImageDataset, cfg: TrainConfig, seed: int, what: str, masks=None, on_epoch_end=None
    ) -> list:
        steps = cfg.epochs
        self.progress.stage(what, max(steps, 1))

        def on_step(epoch, step, steps_per_epoch, loss):
            self.progress.advance(epoch + step / steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}")

        x, y = data.x_train.to(self.device), data.y_train.to(self.device)
        return train(model, x, y, cfg, seed, masks=masks, on_step=on_step, on_epoch_end=on_epoch_end)

    def rewind_epochs(self, key: dict) -> set[int]:
        """Epochs whose weights the winning tickets of this dense model rewind to (saved while
        training); per dense model, since a rewind_fraction resolves against its own epochs."""
        return {
            c.config["pruning"]["rewind_epoch"]
            for c in self._cells()
            if c.axes.get("adjust") == "winning_ticket" and c.dense_key == key
        }

    def dense(self, key: dict) -> DenseModel:
        """The dense model of (data, model, training, regime, seed), trained once and cached, with
        the weights of every rewind epoch the study needs."""
        h = config_hash(key)
        if h in self._dense:
            return self._dense[h]
        path = self.ckpt_dir / f"dense-{h}.pt"
        torch.manual_seed(key["seed"])
        model = self.new_model(key)
        wanted = self.rewind_epochs(key) - {0}
        state = checkpoint.load(path) if path.exists() else None
        if state is not None and "diverged" in state:  # every cell of this dense model fails at once
            raise TrainingDiverged(f"the dense model diverged: {state['diverged']}")
        if key["model"].get("weights"):  # a user's trained model is the dense model
            model = checkpoint.load_user_weights(model, key["model"]["weights"])
            out = DenseModel(to_device(model, self.device), copy.deepcopy(model.state_dict()), [], {})
        elif state is not None and wanted <= set(state.get("rewind", {})):
            checkpoint.load_state_into(model, state["state"], f"checkpoint {path}")
            model = to_device(model, self.device)
            out = DenseModel(model, state["init_state"], state["history"], state.get("rewind", {}))
        else:  # (training is deterministic: a checkpoint without the rewind weights is redone identically)
            init_state = copy.deepcopy(model.state_dict())
            model = to_device(model, self.device)
            data = self.regime_data(key)
            rewind: dict[int, dict] = {}

            def keep(epoch: int, m: torch.nn.Module) -> None:
                if epoch in wanted:
                    rewind[epoch] = {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}

            try:
                history = self._train(
                    model,
                    data,
                    dense_training(key),
                    key["seed"],
                    f"train dense ({key['regime']['name']})",
                    on_epoch_end=keep if wanted else None,
                )
            except TrainingDiverged as e:  # remembered, so the pruned cells of this model do not retrain it
                checkpoint.save({"diverged": str(e), "key": key}, path)
                raise
            checkpoint.save(
                {
                    "state": model.state_dict(),
                    "init_state": init_state,
                    "history": history,
                    "key": key,
                    "rewind": rewind,
                },
                path,
            )
            out = DenseModel(model, init_state, history, rewind)
        out.model.eval()
        if len(self._dense) >= 4:
            self._dense.pop(next(iter(self._dense)))
        self._dense[h] = out
        return out

    def pruned(self, key: dict, pr: dict, method, params) -> tuple[torch.nn.Module, list]:
        """The dense model pruned one-shot, then fine-tuned; or iteration k of Jordão & Pedrini's
        Algorithm 1 (rounds > 1): iteration k-1's fine-tuned model loses the share `sparsity` of
        what remains, scored on that model, and is fine-tuned again. Fine-tuned weights are cached
        (keyed without the evaluation settings), so changing what is evaluated never retrains. The
        checkpoint also holds every score the criterion gave, so the pruned architecture is
        rebuilt by replaying them rather than by running the criterion again."""
        model, history, _ = self._pruned(key, pr, method, params)
        return model, history

    def _pruned(self, key: dict, pr: dict, method, params) -> tuple[torch.nn.Module, list, list]:
        dense = self.dense(key)
        it = pr.get("iteration") or 1
        ft = TrainConfig(**pr["finetune"]) if pr["finetune"] else None
        path = self._cache_path("pruned", key, pr)
        cached = checkpoint.load(path) if ft is not None and path.exists() else None
        if cached is not None and cached.get("recordings"):  # structured: replay the stored scores
            model = copy.deepcopy(dense.model)
            for recording in cached["recordings"]:
                self._replay(method, model, pr, params, recording)
            self._keep_plan(key, pr, cached["recordings"][-1])
            return (*self._load_cached(model, cached, path), cached["recordings"])
        if it > 1:
            model, history, recordings = self._pruned(key, pr | {"iteration": it - 1}, method, params)
            history, recordings = list(history), list(recordings)
        else:
            model, history, recordings = copy.deepcopy(dense.model), [], []
        self.progress.stage(f"prune {pr['method']} s={pr['sparsity']:g}" + (f" iteration {it}" if it > 1 else ""), 1)
        self._share_mrs(method, key)
        recording = Recording(method.criterion(params)) if isinstance(method, Structured) else None
        masks = method.prune(
            model,
            pr["sparsity"],
            self.example_input(),
            params,
            self.criterion_batch(key) if method.needs_data(params) else None,
            **({"criterion": recording} if recording else {}),
        )
        model = to_device(model, self.device)  # pruning makes new, plain-layout tensors
        if recording is not None:
            recordings.append(self._recorded(method, recording))
            self._keep_plan(key, pr, recordings[-1])
        if ft is None:
            return model.eval(), history, recordings
        if cached is not None:  # pruned again (masks, channel_l1, or a checkpoint from before scores were kept)
            return (*self._load_cached(model, cached, path), recordings)
        seed = key["seed"] + FINETUNE_SEED_OFFSET + (it - 1) * ROUND_SEED_STRIDE
        what = f"fine-tune {ft.epochs} epochs" + (f" (iteration {it})" if "iteration" in pr else "")
        fit = self._train(model, self.regime_data(key), self._with_threshold(ft, key), seed, what, masks)
        history += [dict(h, iteration=it) for h in fit] if "iteration" in pr else fit
        checkpoint.save({"state": model.state_dict(), "history": history, "recordings": recordings}, path)
        return model.eval(), history, recordings

    def _with_threshold(self, cfg: TrainConfig, key: dict) -> TrainConfig:
        """A fine-tuning config whose magnitude penalty takes tau from the dense model (reverse pruning)."""
        p = cfg.magnitude_penalty
        if p is None or p.threshold is not None:
            return cfg
        tau = reverse_threshold(self.dense(key).model, p.threshold_from_reverse)
        return cfg.model_copy(update={"magnitude_penalty": p.model_copy(update={"threshold": tau})})

    def _share_mrs(self, method, key: dict) -> None:
        """MRPF entries on the same dense model (other criteria, sparsities, fine-tuning) compute
        the same MRS: keep it in a file next to the checkpoints."""
        if hasattr(method, "mrs_key"):
            method.mrs_cache = MRSCache(self.ckpt_dir, key)

    @staticmethod
    def _recorded(method, recording: Recording) -> dict:
        """The recording's state, plus the per-group plan of a method that chose its ratios (mrpf)."""
        plan = getattr(method, "last_plan", None)
        return recording.state() | ({"plan": plan} if plan is not None else {})

    def _replay(self, method, model, pr: dict, params, recording: dict) -> None:
        plan = {"plan": recording["plan"]} if "plan" in recording else {}
        method.prune(model, pr["sparsity"], self.example_input(), params, None, criterion=Replay(recording), **plan)

    def _keep_plan(self, key: dict, pr: dict, recording: dict) -> None:
        if "plan" in recording:
            self._plans[config_hash({"dense": key, "pruning": pr})] = recording["plan"]

    def plan_metrics(self, cell: Cell) -> dict[str, float]:
        """mrs:<group> and ratio:<group> of a cell pruned by a method that set per-group ratios; with
        MRPF's match_flops also the global ratio it chose and the FLOPs reductions it matched."""
        from robustprune.evaluation.names import plan_metric

        pr = cell.config["pruning"]
        plan = self._plans.get(config_hash({"dense": cell.dense_key, "pruning": pr})) if pr else None
        if plan is None:
            return {}
        out = {
            plan_metric(kind, group): float(v)
            for kind, values in (("mrs", plan["mrs"]), ("ratio", plan["ratios"]))
            for group, v in values.items()
        }
        return out | {plan_metric("mrpf", k): float(plan[k]) for k in MATCHED if k in plan}

    def _cache_path(self, kind: str, key: dict, pr: dict) -> Path:
        return self.ckpt_dir / f"{kind}-{config_hash({'dense': key, 'pruning': pr})}.pt"

    def _load_cached(self, model, state: dict, path: Path) -> tuple[torch.nn.Module, list]:
        checkpoint.load_state_into(model, state["state"], f"checkpoint {path}")
        return to_device(model, self.device).eval(), state["history"]

    def _trained_or_cached(self, kind: str, key: dict, pr: dict, model, train_now) -> tuple[torch.nn.Module, list]:
        """The weights of (dense model, pruning setting) from the cache, or train_now() and cache them."""
        path = self._cache_path(kind, key, pr)
        if path.exists():
            return self._load_cached(model, checkpoint.load(path), path)
        history = train_now()
        checkpoint.save({"state": model.state_dict(), "history": history}, path)
        return model.eval(), history

    def adjusted(self, key: dict, pr: dict, method, params) -> tuple[torch.nn.Module, list]:
        """Jordão & Pedrini's Table 3 schemes: the pruned structure (found on the trained dense
        model) on fresh random weights trained as long as the dense model (scratch_e) or twice as
        long (scratch_b; with the entry's `scratch_b: flops`, for the dense training's FLOPs as Liu
        et al. 2019), or on the dense weights of epoch k trained for the remaining epochs
        (winning_ticket). Cached like fine-tuned models."""
        dense = self.dense(key)
        scheme = pr["adjust"]
        data = self.criterion_batch(key) if method.needs_data(params) else None
        found = copy.deepcopy(dense.model)
        self.progress.stage(f"prune {pr['method']} s={pr['sparsity']:g}", 1)
        self._share_mrs(method, key)
        if isinstance(method, Structured):
            recording = Recording(method.criterion(params))
            method.prune(found, pr["sparsity"], self.example_input(), params, data, criterion=recording)
            recording = self._recorded(method, recording)
            self._keep_plan(key, pr, recording)
            masks = None
        else:
            masks = method.prune(found, pr["sparsity"], self.example_input(), params, data)
        torch.manual_seed(key["seed"] + ADJUST_SEED_OFFSET)
        model = self.new_model(key)
        if scheme == "winning_ticket":
            k = pr["rewind_epoch"]
            checkpoint.load_state_into(model, dense.init_state if k == 0 else dense.rewind[k], "the rewind weights")
        model = to_device(model, self.device)
        if masks is None:
            self._replay(method, model, pr, params, recording)
            model = to_device(model, self.device)
        else:
            masks = {n: m.to(self.device) for n, m in masks.items()}
            apply_masks_(model, masks)
        epochs = dense_training(key).epochs
        # Jordão & Pedrini double the epochs; a cell without the setting is older than it: FLOPs-matched
        if scheme == "scratch_b" and pr.get("scratch_b", "flops") == "epochs":
            epochs *= 2
        elif scheme == "scratch_b":  # as many FLOPs as the dense model's training
            ex = self.example_input()
            dense_flops = size_metrics(dense.model, ex, 1)["flops_nonzero"]
            epochs = max(1, round(epochs * dense_flops / max(size_metrics(model, ex, 1)["flops_nonzero"], 1.0)))
        elif scheme == "winning_ticket":
            epochs = max(0, epochs - pr["rewind_epoch"])
        cfg = dense_training(key).model_copy(update={"epochs": epochs})
        return self._trained_or_cached(
            "adjusted",
            key,
            pr,
            model,
            lambda: self._train(
                model, self.regime_data(key), cfg, key["seed"] + ADJUST_SEED_OFFSET, f"{scheme} {epochs} epochs", masks
            ),
        )

    def criterion_batch(self, key: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images a data-driven criterion scores with: the first CRITERION_IMAGES of
        the regime's training set (fixed, so pruning the same model twice gives the same result)."""
        data = self.regime_data(key)
        x, y = data.x_train[:CRITERION_IMAGES], data.y_train[:CRITERION_IMAGES]
        return to_float(x.to(self.device)), y.to(self.device)

    def lottery_round(self, key: dict, params, r: int) -> tuple[torch.nn.Module, dict, list]:
        """Round r of the lottery ticket: prune `rate` of the remaining weights of round r-1's
        trained model, rewind to the initial weights, retrain under the mask."""
        dense = self.dense(key)
        if r == 0:
            masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in prunable_weights(dense.model).items()}
            return dense.model, masks, dense.history
        h = config_hash({"dense": key, "lottery": params.model_dump(), "round": r})
        path = self.ckpt_dir / f"lottery-{h}.pt"
        model = self.new_model(key)
        if path.exists():
            state = checkpoint.load(path)
            checkpoint.load_state_into(model, state["state"], f"checkpoint {path}")
            return to_device(model, self.device).eval(), state["masks"], state["history"]
        prev_model, prev_masks, _ = self.lottery_round(key, params, r - 1)
        masks = global_magnitude_masks(prev_model, params.rate, prev_masks)
        rewind_(model, dense.init_state, masks)
        model = to_device(model, self.device)
        data = self.regime_data(key)
        cfg = dense_training(key)
        cfg = cfg if params.epochs is None else cfg.model_copy(update={"epochs": params.epochs})
        history = self._train(model, data, cfg, key["seed"] + r, f"lottery ticket round {r}", masks)
        checkpoint.save({"state": model.state_dict(), "masks": masks, "history": history}, path)
        return model.eval(), masks, history

    def model_of(self, cell: Cell) -> tuple[torch.nn.Module, list]:
        """The (trained, pruned, adjusted) model a cell evaluates, and its training history."""
        key = cell.dense_key
        pr = cell.config["pruning"]
        if pr is None:
            dense = self.dense(key)
            return dense.model, dense.history
        method = PRUNING_METHODS.get(pr["method"])()
        params = method.Params(**pr["params"])
        if method.iterative:
            model, _, history = self.lottery_round(key, params, pr["round"])
            return model, history
        if pr.get("adjust"):
            return self.adjusted(key, pr, method, params)
        return self.pruned(key, pr, method, params)

    # ---- evaluation inputs shared by cells ----------------------------------------------------
    def check_inputs(self) -> None:
        """Everything a study reads (data, weights files, evaluation inputs) is checked before any
        file is written, so a mistake costs nothing and changes nothing."""
        base = self.base_data()
        for label, model_cfg in self.study.model_items():
            try:  # one image of the dataset's shape through each architecture: its args fit these images
                check_model(
                    model_cfg.name,
                    model_cfg.args,
                    dataset=self.study.dataset,
                    num_classes=base.num_classes,
                    image_shape=base.image_shape,
                    mean=base.mean,
                    std=base.std,
                )
            except UserError as e:
                raise UserError(f"models.{label}: {e}" if label else str(e)) from None
        for _, model_cfg in self.study.model_items():
            if model_cfg.weights:
                model = self.new_model({"model": {"name": model_cfg.name, "args": model_cfg.args}})
                checkpoint.load_user_weights(model, model_cfg.weights)
        self.check_evaluation_inputs()

    def check_evaluation_inputs(self) -> None:
        """Problems with what the evaluation reads are reported before any work starts."""
        ev = self.study.evaluation
        shape = self.base_data().image_shape
        for size in ev.occlusion:
            if size > min(shape[1:]):
                raise UserError(
                    f"evaluation.occlusion size {size} is larger than the {shape[1]}x{shape[2]} "
                    f"images of '{self.study.dataset}'; use sizes up to {min(shape[1:])}"
                )
        c = ev.corruptions
        if c is not None and c.source == "cifar10c":
            x, _ = load_cifar10c(c.cifar10c_dir, ev.corruption_types()[0], c.severities[0])
            if tuple(x.shape[1:]) != tuple(shape):
                raise UserError(
                    f"CIFAR-10-C images are {tuple(x.shape[1:])} but the study's dataset "
                    f"'{self.study.dataset}' has {tuple(shape)}; use corruptions.source: generated"
                )

    def corrupted(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One corruption at every listed severity of the shift subset, as uint8 images (like the
        official CIFAR-10-C files); generated once per study folder and kept on disk."""
        ev = self.study.evaluation
        c = ev.corruptions
        base = self.base_data()
        if c.source == "cifar10c":
            parts = [load_cifar10c(c.cifar10c_dir, kind, s) for s in c.severities]
            xs = torch.stack([first(x, ev.shift_subset) for x, _ in parts])
            ys = torch.stack([first(y, ev.shift_subset) for _, y in parts])
            return xs.to(self.device), ys
        h = config_hash(
            {
                "dataset": self.study.dataset,
                "data": dump(self.study.data, False),
                "kind": kind,
                "severities": c.severities,
                "seed": c.seed,
                "n": ev.shift_subset,
            }
        )
        path = self.ckpt_dir / f"corrupt-{h}.pt"
        y = first(base.y_test, ev.shift_subset)
        if path.exists():
            xs = checkpoint.load(path)["images"]
        else:
            x = first(base.x_test, ev.shift_subset)
            xs = torch.stack([(corrupt(x, kind, s, c.seed) * 255).round_().to(torch.uint8) for s in c.severities])
            checkpoint.save({"images": xs}, path)
        return xs.to(self.device), y.expand(len(c.severities), -1)

    def _cells(self) -> list[Cell]:
        if self._all_cells is None:
            self._all_cells = expand(self.study)
        return self._all_cells

    def transfer_sets(self, cell: Cell) -> dict[str, torch.Tensor]:
        """For a cell whose model is in evaluation.transfer.models: the attacked test images crafted
        on each other listed model of the same regime and seed (kept on disk)."""
        ev = self.study.evaluation
        t = ev.transfer
        if t is None:
            return {}
        group = [
            c
            for c in self._cells()
            if c.axes["regime"] == cell.axes["regime"] and c.axes["seed"] == cell.axes["seed"] and selected(c, t.models)
        ]
        if cell.hash not in {c.hash for c in group}:
            return {}
        entry = ev.attacks[t.attack]
        attack = entry.build(t.attack, ev.transfer_eps())
        base = self.regime_data(cell.dense_key)
        x = first(base.x_test, ev.attack_subset)
        y = first(base.y_test, ev.attack_subset)
        out = {}
        for source in group:
            if source.hash == cell.hash:
                continue
            # keyed by the source model and the attack, not by the rest of the evaluation settings
            model_config = {k: v for k, v in source.config.items() if k != "evaluation"}
            h = config_hash(
                {
                    "source": model_config,
                    "attack": entry.model_dump(),
                    "label": t.attack,
                    "eps": ev.transfer_eps(),
                    "n": ev.attack_subset,
                }
            )
            path = self.ckpt_dir / f"transfer-{h}.pt"
            if path.exists():
                x_adv = checkpoint.load(path)["images"]
            else:
                self.progress.stage(f"craft transfer set on {setting_key(source.axes)}", 1)
                model, _ = self.model_of(source)
                x_adv = craft(model, attack, x.to(self.device), y.to(self.device), ev.batch_size).cpu()
                checkpoint.save({"images": x_adv}, path)
            out[setting_key(source.axes)] = x_adv.to(self.device)
        return out


def selected(cell: Cell, models) -> bool:
    """Whether a cell's model is one of the ModelSelectors."""
    return any(m.matches(cell.axes) for m in models)


def craft(model: torch.nn.Module, attack, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Adversarial versions of x (uint8 or float) crafted on `model`, float in [0, 1]."""
    parts = [
        attack(model, to_float(x[i : i + batch_size]), y[i : i + batch_size]) for i in range(0, len(x), batch_size)
    ]
    return torch.cat(parts) if parts else to_float(x)


def evaluate(
    model: torch.nn.Module,
    cell: Cell,
    data: ImageDataset,
    ws: Workspace,
    dense_weights: int,
    record: dict | None = None,
) -> dict[str, float]:
    """Clean accuracy, each of the regime's test sets, the robustness suite, size. With `record`,
    record[metric] keeps which test images each accuracy counted as correct."""
    study = ws.study
    ev = study.evaluation
    x_test, y_test = data.x_test.to(ws.device), data.y_test.to(ws.device)
    out = {"acc_clean": accuracy(model, x_test, y_test, ev.batch_size, record, "acc_clean")}
    if data.x_val is not None:  # what model selection may look at
        out[names.VALIDATION] = accuracy(model, data.x_val.to(ws.device), data.y_val, ev.batch_size)
    for name, (x, y) in data.extra_tests.items():
        out[f"acc_{name}"] = accuracy(model, x.to(ws.device), y, ev.batch_size, record, f"acc_{name}")
    regime_name = cell.dense_key["regime"]["name"]
    regime = REGIMES.get(regime_name)()
    out.update(
        evaluate_robustness(
            model,
            x_test,
            y_test,
            ev,
            ws.progress,
            corrupted=ws.corrupted,
            transfer_sets=ws.transfer_sets(cell),
            regime_tests=data.extra_tests,
            regime_transfer=regime.transfer_tests(regime.Params(**study.regimes[regime_name])),
            record=record,
        )
    )
    out.update(size_metrics(model, ws.example_input(), dense_weights))
    out.update(layer_widths(model))
    out.update(weight_statistics(model))
    if ev.single_element and cell.config["pruning"] is None:
        out.update(single_element_metrics(model, x_test, y_test, ev, ws.progress))
    if ev.latency_batch:  # the real speed-up of a pruned model, not only its FLOPs
        batch = to_float(x_test[: ev.latency_batch])
        # one thread: comparable across cells whatever else the machine runs (threads wait on busy cores)
        out["latency_ms"] = measure_latency(model, batch, threads=1)["median_ms"]
    return out


def single_element_metrics(model, x_test, y_test, ev, progress: Progress) -> dict[str, float]:
    """Algorithm 2 on a dense model: the Fig. 5 fractions per attack (at its report eps) and tolerance."""
    se = ev.single_element
    x, y = to_float(x_test[: se.images]), y_test[: se.images]
    attacks = {
        names.adv(label, ev.shown_eps(label)): e.build(label, ev.shown_eps(label))
        for label, e in ev.attacks.items()
        if (e.subset is None if se.attacks is None else label in se.attacks)
    }
    evaluate_fn = make_evaluator(x, y, attacks, ev.batch_size)
    baseline = evaluate_fn(model)

    def on_element(done: int, n: int, row: dict) -> None:  # done counts from 1
        if done == 1:
            progress.stage(f"Algorithm 2: single {se.kind}", n)
        progress.advance(done, f"{done}/{n} {se.kind}")

    rows = single_element_study(
        model, se.kind, evaluate_fn, x[:16], max_elements=se.max_elements, seed=se.seed, on_element=on_element
    )
    out = {names.single(se.kind, "", None): float(len(rows))}
    if rows:
        for rob, by_t in improvement_fractions(rows, baseline, tolerances=se.tolerances).items():
            out.update({names.single(se.kind, rob, t): f for t, f in by_t.items()})
    return out


def run_cell(cell: Cell, ws: Workspace, record: dict | None = None) -> tuple[dict[str, float], list]:
    dense = ws.dense(cell.dense_key)
    data = ws.regime_data(cell.dense_key)
    dense_weights = sum(w.numel() for w in prunable_weights(dense.model).values())
    model, history = ws.model_of(cell)
    for name, t in model.state_dict().items():  # e.g. a loaded file or a fine-tuning that blew up between checks
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TrainingDiverged(f"the model holds NaN or infinite values in {name}")
    return evaluate(model, cell, data, ws, dense_weights, record) | ws.plan_metrics(cell), history


def compute_and_store(cell: Cell, ws: Workspace, store: Store) -> tuple[str, float]:
    """Run one cell and write it (all metrics in one transaction). A diverging run is stored as
    failed with its reason and the study goes on."""
    t0 = time.perf_counter()
    per_image: dict = {}
    try:
        metrics, history = run_cell(cell, ws, per_image)
        status, error = "done", None
    except TrainingDiverged as e:
        metrics, history, status, error, per_image = {}, None, "failed", str(e), {}
    wall = time.perf_counter() - t0
    store.put(cell, metrics, wall, history, status, error, per_image=per_image)
    return status, wall


class MRSCache:
    """MRPF's Module Robust Sensitivity of one dense model, one file per MRS setting."""

    def __init__(self, folder: Path, dense_key: dict):
        self.folder, self.dense_key = folder, dense_key

    def path(self, settings: dict) -> Path:
        return self.folder / f"mrs-{config_hash({'dense': self.dense_key, 'mrs': settings})}.pt"

    def get(self, settings: dict) -> dict[str, float] | None:
        path = self.path(settings)
        return checkpoint.load(path)["mrs"] if path.exists() else None

    def put(self, settings: dict, mrs: dict[str, float]) -> None:
        checkpoint.save({"mrs": {g: float(v) for g, v in mrs.items()}}, self.path(settings))
