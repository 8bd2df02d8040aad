"""Training-dynamics metrics of Jordão & Pedrini (Fig. 2): gradient confusion and layer rotation.

Gradient confusion (Sankararaman et al. 2020). Their definition: the gradients of the batch
losses f_i have confusion bound eta >= 0 when <grad f_i, grad f_j> >= -eta for every pair i != j;
confusion is *high* when two batches pull the weights in opposite directions (a very negative inner
product), and their plots measure it as the minimum pairwise cosine similarity (higher = less
confusion). Jordão & Pedrini describe what they plot as "the minimum cosine dissimilarity
(distance) between all pairs of training batches, where the higher the distance the better".
`gradient_confusion` returns that wording literally by default, min over pairs of
1 - cos(g_i, g_j) (`measure="distance"`), and Sankararaman's quantity, min over pairs of
cos(g_i, g_j), with `measure="similarity"`. The two are not the same function of the gradients:
the distance form is 1 - (the largest similarity), so it looks at the most *aligned* pair, while
the similarity form looks at the most *opposed* pair. `gradient_cosines` gives the whole matrix,
and `EpochDynamics` records both forms, so either reading can be plotted from one run.

Layer rotation (Carbonnelle & De Vleeschouwer 2019): the cosine distance 1 - cos(w, w0) between a
layer's weights and their initial values, for the last convolution before the classifier
(0 at init, 1 for orthogonal weights, 2 for negated weights)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.tensors import to_float


def _batches(
    x: torch.Tensor, y: torch.Tensor, n_batches: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n_batches batches drawn with a seeded generator: disjoint batches from one permutation when
    x holds at least n_batches * batch_size images, else each batch the first min(batch_size,
    len(x)) images of its own permutation (batches may then share images)."""
    if n_batches < 2:
        raise ValueError(f"gradient confusion compares pairs of batches; n_batches must be >= 2, got {n_batches}")
    if batch_size < 1 or len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"need batch_size >= 1 and as many labels as images (at least one), got batch_size "
            f"{batch_size}, {len(x)} images and {len(y)} labels"
        )
    g = torch.Generator(device="cpu").manual_seed(seed)
    if len(x) >= n_batches * batch_size:
        order = torch.randperm(len(x), generator=g)
        idxs = [order[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    else:
        idxs = [torch.randperm(len(x), generator=g)[:batch_size] for _ in range(n_batches)]
    return [(x[idx.to(x.device)], y[idx.to(y.device)]) for idx in idxs]


def gradient_cosines(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The n x n matrix of cosine similarities between the gradients of the mean cross-entropy loss
    of each batch w.r.t. all trainable parameters (float64, on the CPU; NaN where a gradient is 0).

    The model is evaluated in eval mode (BatchNorm uses its running statistics and they do not
    change; no dropout), so the measurement has no side effect; its mode is restored afterwards.
    Parameter .grad fields are not touched. Memory: n gradient vectors of the model's size."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to take gradients of")
    device = params[0].device
    was_training = model.training
    model.eval()
    grads = []
    try:
        for xb, yb in batches:
            xb, yb = to_float(xb.to(device)), yb.to(device)
            with torch.enable_grad():
                loss = F.cross_entropy(model(xb).float(), yb)
                gs = torch.autograd.grad(loss, params, allow_unused=True)
            grads.append(
                torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(gs, params)]
                )
            )
    finally:
        model.train(was_training)
    gmat = torch.stack(grads)
    gram = gmat @ gmat.T
    norms = gram.diagonal().sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(
        denom > 0, gram / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.full_like(gram, float("nan"))
    )
    return cos.clamp(-1.0, 1.0).cpu()


def _pair_values(cos: torch.Tensor) -> torch.Tensor:
    i, j = torch.triu_indices(len(cos), len(cos), offset=1)
    return cos[i, j]


def confusion_from_cosines(cos: torch.Tensor, measure: str = "distance") -> float:
    """min over pairs i < j of 1 - cos_ij ("distance", the paper's wording) or of cos_ij
    ("similarity", Sankararaman et al.); NaN when any pair's cosine is undefined (a zero gradient)."""
    pairs = _pair_values(cos)
    if measure == "distance":
        pairs = 1.0 - pairs
    elif measure != "similarity":
        raise ValueError(f"measure must be 'distance' or 'similarity', got {measure!r}")
    if len(pairs) == 0 or bool(torch.isnan(pairs).any()):
        return float("nan")
    return float(pairs.min())


def gradient_confusion(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n_batches: int = 8,
    batch_size: int = 128,
    seed: int = 0,
    measure: str = "distance",
) -> float:
    """Gradient confusion of `model` on n_batches batches of (x, y) drawn with `seed` (the same
    seed gives the same batches): by default the minimum over all pairs of batches of the cosine
    distance 1 - cos(g_i, g_j) between their loss gradients, as Jordão & Pedrini word it (range
    [0, 2]); `measure="similarity"` gives Sankararaman et al.'s minimum cosine similarity (range
    [-1, 1], higher = less confusion). See the module docstring for why both exist, and
    `gradient_cosines` for the raw pairwise matrix. x: uint8 or float images in [0, 1]."""
    cos = gradient_cosines(model, _batches(x, y, n_batches, batch_size, seed))
    return confusion_from_cosines(cos, measure)


def last_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The last nn.Conv2d in module order (the last convolution before the classifier in the
    architectures of this package)."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no nn.Conv2d layer; name the layer to measure with layer=")
    return convs[-1]


def _init_weight(init_state, name: str) -> torch.Tensor:
    if isinstance(init_state, nn.Module):
        init_state = init_state.state_dict()
    key = f"{name}.weight" if name else "weight"
    if key not in init_state:
        raise ValueError(
            f"the initial state has no '{key}'; pass the state_dict (or model) of the same "
            f"architecture taken at initialisation"
        )
    return init_state[key]


def layer_rotation(
    model: nn.Module, init_state: Mapping[str, torch.Tensor] | nn.Module, layer: str | None = None
) -> float:
    """Cosine distance 1 - cos(w, w0) between the weight of `layer` (qualified module name; default:
    the last nn.Conv2d in module order) and its initial value in `init_state` (a state_dict or a
    model of the same architecture). 0 at init, 1 when orthogonal, 2 when negated; NaN if either
    weight is all zero.

    A pruned model must be compared with initial weights of its own (pruned) shape, e.g. the
    initial state pruned with the same plan (as a winning ticket keeps it); a shape mismatch raises
    ValueError rather than guessing which filters survived."""
    if layer is None:
        layer, module = last_conv(model)
    else:
        modules = dict(model.named_modules())
        if layer not in modules or not isinstance(getattr(modules[layer], "weight", None), torch.Tensor):
            raise ValueError(f"the model has no layer '{layer}' with a weight")
        module = modules[layer]
    w = module.weight.detach()
    w0 = _init_weight(init_state, layer)
    if tuple(w.shape) != tuple(w0.shape):
        raise ValueError(
            f"layer '{layer}' has weight shape {tuple(w.shape)} but the initial state has "
            f"{tuple(w0.shape)}; pass the initial weights of the same (pruned) architecture"
        )
    w, w0 = w.reshape(-1).double().cpu(), w0.detach().reshape(-1).double().cpu()
    denom = float(w.norm() * w0.norm())
    if denom == 0:
        return float("nan")
    return 1.0 - max(-1.0, min(1.0, float(w @ w0) / denom))


class EpochDynamics:
    """Per-epoch training-dynamics probe for the training loop's end-of-epoch hook:
    `dynamics(epoch, model) -> {'grad_confusion', 'grad_cos_min', 'layer_rotation'}`.

    Fixed at construction: a probe of n_batches * batch_size training images drawn with `seed`
    (the same batches every epoch, so epochs are comparable) and the initial weights (`init`: the
    model before training, copied now, or its state_dict). `grad_confusion` is the paper's minimum
    pairwise cosine distance, `grad_cos_min` Sankararaman's minimum pairwise cosine similarity (both
    from one set of gradients), `layer_rotation` the rotation of `layer` (default: the last conv).
    Cost: n_batches forward + backward passes on batch_size images. Every result is also appended to
    `history`."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        init: nn.Module | Mapping[str, torch.Tensor],
        *,
        n_batches: int = 8,
        batch_size: int = 64,
        seed: int = 0,
        layer: str | None = None,
    ):
        g = torch.Generator(device="cpu").manual_seed(seed)
        keep = torch.randperm(len(x), generator=g)[: n_batches * batch_size]
        self.x, self.y = x[keep.to(x.device)].clone(), y[keep.to(y.device)].clone()
        state = init.state_dict() if isinstance(init, nn.Module) else init
        self.init_state = {k: v.detach().clone() for k, v in state.items()}
        self.n_batches, self.batch_size, self.seed, self.layer = n_batches, batch_size, seed, layer
        self.history: list[dict] = []
        self._batches = _batches(self.x, self.y, n_batches, batch_size, seed)  # the same every epoch

    def __call__(self, epoch: int, model: nn.Module) -> dict[str, float]:
        cos = gradient_cosines(model, self._batches)
        out = {
            "grad_confusion": confusion_from_cosines(cos, "distance"),
            "grad_cos_min": confusion_from_cosines(cos, "similarity"),
            "layer_rotation": layer_rotation(model, self.init_state, self.layer),
        }
        self.history.append({"epoch": epoch, **out})
        return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state (the `init_state` of layer_rotation)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
