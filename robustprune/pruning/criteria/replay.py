"""Prune a second model exactly as a first one was pruned: Recording wraps a criterion and keeps
every score it gives (in call order); Replay hands the same scores back. The engine is
deterministic given the scores, so replaying on a model of the same architecture removes the
same filters and blocks; this is how a winning ticket gets the pruned structure onto rewound
weights without index bookkeeping, and how a cached pruned model is rebuilt without running its
criterion again (`Recording.state()` is plain tensors, so it is stored in the checkpoint)."""

from __future__ import annotations

import torch

from robustprune.pruning.criteria.base import Criterion


class Recording(Criterion):
    def __init__(self, inner: Criterion):
        self.inner = inner
        self.name = inner.name
        self.normalized = getattr(inner, "normalized", False)
        self.group_scores: list[torch.Tensor] = []
        self.block_score_list: list[torch.Tensor] = []

    def prepare(self, model, x=None, y=None):
        self.inner.prepare(model, x, y)

    def __call__(self, group):
        scores = self.inner(group)
        self.group_scores.append(scores.detach().clone())
        return scores

    def block_scores(self, model, blocks, x=None, y=None):
        scores = self.inner.block_scores(model, blocks, x, y)
        self.block_score_list.append(scores.detach().clone())
        return scores

    def state(self) -> dict:
        """Everything Replay needs, as tensors and plain values (safe for weights-only checkpoints)."""
        return {
            "name": self.name,
            "normalized": bool(self.normalized),
            "groups": [s.cpu() for s in self.group_scores],
            "blocks": [s.cpu() for s in self.block_score_list],
        }


class Replay(Criterion):
    def __init__(self, recording: Recording | dict):
        """From a Recording, or from its state() as stored in a checkpoint."""
        if isinstance(recording, Recording):
            recording = recording.state()
        self.name = recording["name"]
        self.normalized = recording["normalized"]
        self._groups = list(recording["groups"])
        self._blocks = list(recording["blocks"])

    def prepare(self, model, x=None, y=None):
        pass  # the scores were computed on the model the recording saw

    def __call__(self, group):
        if not self._groups:
            raise RuntimeError("replay asked for more group scores than were recorded (different architecture?)")
        return self._groups.pop(0)

    def block_scores(self, model, blocks, x=None, y=None):
        if not self._blocks:
            raise RuntimeError("replay asked for more block scores than were recorded (different architecture?)")
        return self._blocks.pop(0)
