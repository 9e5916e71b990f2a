"""Tiny sub-model networks for the tests (random weights, or hand-set ones with a known answer).

Importable as ``_subnets`` (pytest puts tests/ on sys.path) so ``exporters.submodels``
can build them from a ``module:function`` factory.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def classifier(n_classes: int = 3) -> nn.Module:
    """Random-weight CNN classifier: (B,3,H,W) float -> (B,n_classes) logits."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, n_classes))


class DarkBoxes(nn.Module):
    """Boxes of side ``2 * half`` around local maxima of darkness; labels from a
    random-weight 1x1 conv (two classes). Input (B,3,H,W) float in [0, 1]."""

    def __init__(self, half: float = 6.0, max_boxes: int = 64) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.label_conv = nn.Conv2d(3, 2, 1)
        self.half, self.max_boxes = half, max_boxes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, w = x.shape[0], x.shape[3]
        dark = F.avg_pool2d(1.0 - x.mean(dim=1, keepdim=True), 5, stride=1, padding=2,
                            count_include_pad=False)
        peak = (dark >= F.max_pool2d(dark, 9, stride=1, padding=4)) & (dark > 0.45)
        scores, idx = torch.topk(torch.where(peak, dark, torch.zeros_like(dark)).reshape(b, -1),
                                 self.max_boxes, dim=1)
        cx = (idx % w).float() + 0.5
        cy = torch.div(idx, w, rounding_mode="floor").float() + 0.5
        boxes = torch.stack([cx - self.half, cy - self.half, cx + self.half, cy + self.half], 2)
        logits = self.label_conv(x).reshape(b, 2, -1)
        labels = torch.gather(logits, 2, idx.unsqueeze(1).expand(b, 2, idx.shape[1])).argmax(1)
        valid = scores > 0  # zero padding, whatever order topk left it in
        return boxes * valid.unsqueeze(2), scores, labels * valid


def dark_boxes() -> nn.Module:
    return DarkBoxes()


class DarkSegmenter(nn.Module):
    """Two-class logits (background, nucleus) at half resolution: nucleus where the mean
    intensity is below 0.55. Hand-set weights; input (B,3,H,W) float in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[20 / 3] * 3, [-20 / 3] * 3]).view(2, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor([-11.0, 11.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(x), 2)


def dark_segmenter() -> nn.Module:
    return DarkSegmenter()


class RandomSegmenter(nn.Module):
    """Random-weight 3-class segmentation logits at full resolution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Drifting(nn.Module):
    """Adds a call counter to its input: eager and traced outputs differ (parity must fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(x.mean(dim=(2, 3))) + float(self.calls)


class RandomPoints(nn.Module):
    """Random-weight point detector: top-16 cells of a conv heatmap -> points (cell
    centres, tile px), sigmoid scores, labels of 3 classes, 2 measurements per point."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 6, 4, stride=4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.conv(x)  # (B, 6, H/4, W/4): heat, 3 class logits, 2 measurements
        b, w = f.shape[0], f.shape[3]
        flat = f.reshape(b, 6, -1)
        scores, idx = torch.topk(torch.sigmoid(flat[:, 0]), 16, dim=1)
        pts = torch.stack([(idx % w).float() * 4 + 2,
                           torch.div(idx, w, rounding_mode="floor").float() * 4 + 2], 2)
        rest = torch.gather(flat[:, 1:], 2, idx.unsqueeze(1).expand(b, 5, 16))
        return pts, scores, rest[:, :3].argmax(1), rest[:, 3:].permute(0, 2, 1)


def random_points() -> nn.Module:
    return RandomPoints()
