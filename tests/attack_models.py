"""Tiny hand-made models shared by the attack tests."""

import torch
from torch import nn

W = torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -3.0, 1.5, -1.0]])
SIGN_LABEL0 = torch.tensor([1.0, -1.0, 1.0, -1.0])


def linear2() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(W)
    return model


def bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.3, -0.2]))
        model[1].running_var.copy_(torch.tensor([2.0, 0.5]))
    return model


def rand_images(n=8, shape=(1, 6, 6), seed=0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))
