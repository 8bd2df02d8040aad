"""The small CNN of Liang et al. (2025) §4.1: two 3x3 conv layers (ReLU, 2x2 max-pool) and two
fully connected layers. Widths are arguments; the study file sets them."""
from __future__ import annotations

from torch import nn

from robustprune.models import MODELS, Normalize


class MnistCNN(nn.Module):
    def __init__(self, num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,),
                 conv1: int = 16, conv2: int = 32, fc: int = 128):
        super().__init__()
        c, h, w = image_shape
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(c, conv1, 3, padding=1)
        self.conv2 = nn.Conv2d(conv1, conv2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(conv2 * (h // 4) * (w // 4), fc)
        self.fc2 = nn.Linear(fc, num_classes)

    def forward(self, x):
        x = self.normalize(x)
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        x = self.act(self.fc1(self.flatten(x)))
        return self.fc2(x)


@MODELS.register("mnist_cnn")
def mnist_cnn(**kwargs) -> nn.Module:
    """Two conv (ReLU, 2x2 max-pool) + two linear layers (Liang et al. 2025); widths conv1, conv2, fc."""
    return MnistCNN(**kwargs)
