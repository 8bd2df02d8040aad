"""MobileViT (Mehta & Rastegari 2021), the XS configuration, as in the paper's Table 4 and Apple's
ml-cvnets.

A 3x3 conv stem with 16 filters (stride 2), then five layers: MobileNetV2 inverted residuals
(expansion 4) with 32 channels (1 block) and 48 channels (3 blocks, the first with stride 2);
then three layers of one stride-2 inverted residual followed by a MobileViT block, with 64, 80
and 96 channels, transformer width d = 96, 120, 144, L = 2, 4, 3 transformer layers, MLP width
2d, 4 heads and 2x2 patches; a 1x1 conv to 384 channels, global average pooling, dropout 0.1 and
a linear classifier. SiLU after every conv that has an activation; a projection conv has none.

MobileViT block (paper §3.1, Fig. 1b): a 3x3 conv (BN, SiLU) and a 1x1 conv to d (no BN) for local
features; unfold into P = 2x2 pixel positions x N patches; L pre-norm transformer layers
(x + attn(LN(x)), x + MLP(LN(x)), MLP = Linear, SiLU, Linear; dropout 0.1 after the attention
and the MLP) applied to each pixel position's sequence of N patches, then LayerNorm; fold back;
a 1x1 conv to the block's channels (BN, SiLU), concatenated with the block's input, and a 3x3
fusion conv (BN, SiLU). A side that is not a multiple of the patch size is resized to the next
multiple around the transformer and back, as ml-cvnets does.

Input variants (`stem`): "imagenet" is the paper's network (stem stride 2, 32x downsampling,
MobileViT blocks on 32, 16, 8 pixels at 256x256). "cifar" (32x32 CIFAR, 64x64 Tiny-ImageNet)
gives the stem and the first stride-2 layer (48 channels) stride 1, as the project's MobileNetV2
CIFAR variant does: 8x downsampling, so on 32x32 images the MobileViT blocks see 16x16, 8x8 and
4x4 maps, all multiples of the 2x2 patch with at least 4 patches per sequence (the paper's
strides would leave the last block a single 2x2 patch). "auto" (default) picks "imagenet" for
sides of at least 128 pixels.

Pruning: the attention is robustprune.models.blocks.MultiHeadSelfAttention (one qkv Linear,
heads prunable), the MLP's first layer a HiddenLinear (its width is filter-prunable); the
stride-1 inverted residuals with equal widths are ResidualBlocks that layer pruning may remove.
With 1000 classes and the ImageNet stem the network has 2,317,848 parameters ("2.3 M" in the paper).
`width_mult` scales every conv width and d (rounded to multiples of 8)."""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.models import mobilenetv2
from robustprune.models.blocks import HiddenLinear, MultiHeadSelfAttention
from robustprune.models.mobilenetv2 import round_channels
from robustprune.models.registry import MODELS, Normalize, fraction, positive, whole
from robustprune.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD, init_weights
from robustprune.models.resnet_imagenet import resolve_stem

# (kind, channels, blocks or transformer layers L, stride (ImageNet), transformer width d)
XS_CONFIG = (
    ("mv2", 32, 1, 1, None),
    ("mv2", 48, 3, 2, None),
    ("vit", 64, 2, 2, 96),
    ("vit", 80, 4, 2, 120),
    ("vit", 96, 3, 2, 144),
)


conv_bn = partial(mobilenetv2.conv_bn, activation=nn.SiLU)


def mv2_block(cin: int, cout: int, stride: int, expansion: int) -> nn.Module:
    """MobileNetV2's inverted residual with SiLU: a removable ResidualBlock when it keeps the shape."""
    if stride == 1 and cin == cout:
        return mobilenetv2.InvertedResidual(cout, expansion, nn.SiLU)
    return mobilenetv2.InvertedBottleneck(cin, cout, stride, expansion, nn.SiLU)


class TransformerLayer(nn.Module):
    """Pre-norm transformer encoder layer on (..., tokens, dim): x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float = 0.1):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads)
        self.attn_drop = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", HiddenLinear(dim, mlp_dim)),
                    ("act", nn.SiLU()),
                    ("fc2", nn.Linear(mlp_dim, dim)),
                    ("drop", nn.Dropout(dropout)),
                ]
            )
        )

    def forward(self, x):
        x = x + self.attn_drop(self.attn(self.attn_norm(x)))
        return x + self.mlp(self.mlp_norm(x))


def unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, p*p pixel positions, N patches, C)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 2, 4, 1)
    return x.reshape(b, p * p, (h // p) * (w // p), c)


def fold(t: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of unfold: (B, p*p, N, C) -> (B, C, H, W)."""
    b, c = t.shape[0], t.shape[-1]
    t = t.reshape(b, p, p, h // p, w // p, c).permute(0, 5, 3, 1, 4, 2)
    return t.reshape(b, c, h, w)


class MobileViTBlock(nn.Module):
    """Local 3x3 conv and 1x1 conv to d, unfold, L transformer layers and LayerNorm, fold, 1x1 conv
    back to the channels, concatenation with the input and 3x3 fusion conv."""

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        num_heads: int = 4,
        mlp_ratio: int = 2,
        patch: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.patch = patch
        self.local = nn.Sequential(
            OrderedDict(
                [
                    ("conv3x3", conv_bn(channels, channels, 3)),
                    ("conv1x1", nn.Conv2d(channels, dim, 1, bias=False)),
                ]
            )
        )
        self.transformer = nn.Sequential(
            *[TransformerLayer(dim, num_heads, mlp_ratio * dim, dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.project = conv_bn(dim, channels, 1)
        self.fuse = conv_bn(2 * channels, channels, 3)

    def forward(self, x):
        y = self.local(x)
        h, w = y.shape[-2:]
        p = self.patch
        ph, pw = -(-h // p) * p, -(-w // p) * p  # next multiples of the patch size
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(ph, pw), mode="bilinear", align_corners=False)
        y = fold(self.norm(self.transformer(unfold(y, p))), ph, pw, p)
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.project(y)], 1))


class MobileViT(nn.Module):
    def __init__(
        self,
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        config=XS_CONFIG,
        stem: str = "auto",
        width_mult: float = 1.0,
        expansion: int = 4,
        num_heads: int = 4,
        patch: int = 2,
        last_expansion: int = 4,
        dropout: float = 0.1,
        classifier_dropout: float = 0.1,
    ):
        super().__init__()
        positive(width_mult=width_mult)
        whole(expansion=expansion, num_heads=num_heads, patch=patch, last_expansion=last_expansion)
        fraction(dropout=dropout, classifier_dropout=classifier_dropout)
        self.stem_kind = resolve_stem(stem, image_shape)
        cifar = self.stem_kind == "cifar"
        self.normalize = Normalize(mean, std)
        cin = round_channels(16 * width_mult)
        self.stem = conv_bn(image_shape[0], cin, 3, stride=1 if cifar else 2)
        layers, first_down = [], True
        for kind, c, n, s, d in config:
            cout = round_channels(c * width_mult)
            if s == 2 and first_down:
                first_down = False
                s = 1 if cifar else 2  # the CIFAR variant keeps the first stride-2 layer at stride 1
            if kind == "mv2":
                blocks = [mv2_block(cin, cout, s, expansion)] + [
                    mv2_block(cout, cout, 1, expansion) for _ in range(n - 1)
                ]
            else:
                blocks = [
                    mv2_block(cin, cout, s, expansion),
                    MobileViTBlock(cout, round_channels(d * width_mult), n, num_heads, 2, patch, dropout),
                ]
            layers.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*layers)  # blocks of one layer share a container (residual_stages)
        last = last_expansion * cin
        self.head = conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)
        for m in self.modules():  # transformer Linear layers: Xavier-uniform, zero bias (usual ViT init)
            if isinstance(m, nn.Linear) and m is not self.classifier:
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.head(self.stages(self.stem(self.normalize(x))))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


@MODELS.register("mobilevit_xs")
def mobilevit_xs(**kwargs) -> nn.Module:
    """MobileViT-XS (Mehta & Rastegari 2021); below 128 px stride-1 stem, 8x downsampling (`stem`); `width_mult`."""
    return MobileViT(**kwargs)
