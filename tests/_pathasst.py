"""Tiny random-weight stand-ins for PathAsst's tools, in their released layouts.

- ``CtSingle``: PathAsst's ``convnext-pathology-classifier`` module: a timm backbone
  ``model_global`` (``num_classes=0``: global average pool + the backbone's head norm)
  and ``fc = Linear(num_features, n)``; its checkpoint is ``{'model': state_dict,
  'args': argparse.Namespace, ...}``.
- ``YoloV5Head`` (also YOLOv7's layout): the Detect layer in eval mode returns
  ``(cat(z, 1), feature maps)``, z (B, na*H*W, 5+nc): x, y, w, h in input px (grid +
  sigmoid offsets times the stride, anchors times sigmoid), objectness and class scores
  (sigmoid).
- ``YoloV8Head``: (B, 4+nc, H*W): x, y, w, h in input px, class scores (sigmoid).
- ``P2PNet``: ``{'pred_logits': (B, N, K+1), 'pred_points': (B, N, 2)}``, anchors on a
  stride-8 lattice plus regressed offsets, in input px.
"""

from __future__ import annotations

import torch
from torch import nn


class CtSingle(nn.Module):
    """PathAsst's classifier module (attribute names as released)."""

    def __init__(self, arch: str = "test_convnext", n_classes: int = 2) -> None:
        super().__init__()
        import timm

        self.model_global = timm.create_model(arch, pretrained=False, num_classes=0)
        self.fc = nn.Linear(self.model_global.num_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.model_global(x))


def _grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, h * w, 2).to(torch.float32)


class _Trunk(nn.Module):
    def __init__(self, stride: int, ch: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, ch, stride, stride=stride), nn.SiLU(),
                                 nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class YoloV5Head(nn.Module):
    """One detection scale (stride 16, 3 anchors) with YOLOv5/v7's output layout."""

    def __init__(self, nc: int = 5, stride: int = 16) -> None:
        super().__init__()
        self.nc, self.na, self.stride = nc, 3, stride
        self.trunk = _Trunk(stride)
        self.m = nn.Conv2d(8, self.na * (5 + nc), 1)
        with torch.no_grad():  # objectness prior: a random net still finds something
            self.m.bias.view(self.na, 5 + nc)[:, 4] += 1.5
        self.register_buffer("anchors", torch.tensor([[10.0, 13], [16, 30], [33, 23]]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.m(self.trunk(x))
        b, _, h, w = f.shape
        p = f.view(b, self.na, 5 + self.nc, h, w).permute(0, 1, 3, 4, 2).sigmoid()
        p = p.reshape(b, self.na, h * w, 5 + self.nc)
        xy = (p[..., :2] * 2 - 0.5 + _grid(h, w)) * self.stride
        wh = (p[..., 2:4] * 2) ** 2 * self.anchors.view(1, self.na, 1, 2)
        z = torch.cat([xy, wh, p[..., 4:]], -1).reshape(b, -1, 5 + self.nc)
        return z, [f]


class YoloV8Head(nn.Module):
    """One scale (stride 16), anchor-free, YOLOv8's (B, 4+nc, N) output."""

    def __init__(self, nc: int = 5, stride: int = 16) -> None:
        super().__init__()
        self.nc, self.stride = nc, stride
        self.trunk = _Trunk(stride)
        self.box = nn.Conv2d(8, 4, 1)
        self.cls = nn.Conv2d(8, nc, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.trunk(x)
        h, w = f.shape[2], f.shape[3]
        ltrb = torch.nn.functional.softplus(self.box(f)).flatten(2) * self.stride
        centre = (_grid(h, w).transpose(1, 2) + 0.5) * self.stride  # (1, 2, N)
        xy = centre + (ltrb[:, 2:] - ltrb[:, :2]) / 2
        wh = ltrb[:, :2] + ltrb[:, 2:]
        return torch.cat([xy, wh, self.cls(f).flatten(2).sigmoid()], 1)


class P2PNet(nn.Module):
    """P2PNet/DPA-P2PNet's output: 4 anchor points per stride-8 cell, K+1 logits."""

    def __init__(self, n_classes: int = 2, stride: int = 8) -> None:
        super().__init__()
        self.k, self.stride = n_classes, stride
        self.trunk = _Trunk(stride)
        self.regression = nn.Conv2d(8, 4 * 2, 3, padding=1)
        self.classification = nn.Conv2d(8, 4 * (n_classes + 1), 3, padding=1)
        with torch.no_grad():  # confident, mostly foreground: a random net finds cells
            self.classification.weight.mul_(60.0)
            self.classification.bias.view(4, n_classes + 1)[:, -1] -= 4.0

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.trunk(x)
        b, _, h, w = f.shape
        offs = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
        anchors = ((_grid(h, w)[:, :, None, :] + offs) * self.stride).reshape(1, -1, 2)
        reg = self.regression(f).permute(0, 2, 3, 1).reshape(b, -1, 2)
        logits = self.classification(f).permute(0, 2, 3, 1).reshape(b, -1, self.k + 1)
        return {"pred_logits": logits, "pred_points": anchors + reg * 2.0}


def yolov7_lbc() -> YoloV5Head:
    torch.manual_seed(1)
    return YoloV5Head(nc=5)


def yolov7_lbc6() -> YoloV5Head:
    torch.manual_seed(1)
    return YoloV5Head(nc=6)


def yolov7_one() -> YoloV5Head:
    torch.manual_seed(4)
    return YoloV5Head(nc=1)


def yolov7_blood() -> YoloV5Head:
    torch.manual_seed(2)
    return YoloV5Head(nc=3)


def yolov8(nc: int = 3) -> YoloV8Head:
    torch.manual_seed(3)
    return YoloV8Head(nc=nc)


def p2pnet(n_classes: int = 2) -> P2PNet:
    torch.manual_seed(4)
    return P2PNet(n_classes)


def p2pnet3() -> P2PNet:
    return p2pnet(3)


def p2pnet4() -> P2PNet:
    return p2pnet(4)


class Mismatched(nn.Module):
    """Outputs that fit no layout: one (B, 7) tensor for a detection task."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))
