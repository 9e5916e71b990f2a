"""Random-weight stand-ins with the compute of PathAsst's released tools, for
``bench/submodels.py --released-size`` (factories for ``python -m exporters.submodels
factory``).

The runtime's overhead is its own work (preparing, decoding, NMS, mapping) against
``session.run``; tiny stand-ins make ``session.run`` cheap and the ratio large. These
nets have the input size, feature strides, anchor counts and head layouts of the
released models, on backbones of their class (not their exact architectures):

- YOLOv7 rows, (B, N, 5+nc) at 640 px: YOLOv7's three scales (strides 8/16/32, three
  anchors each, its default anchors: 25,200 rows) on timm's ``cs3darknet_s`` (a
  YOLOv5s-class CSP-Darknet, lighter than YOLOv7 itself: a conservative stand-in).
- YOLOv8 columns, (B, 4+nc, N) at 640 px: the same backbone, YOLOv8's decoupled head (two
  3x3 convs per branch, DFL over 16 bins: 8,400 anchors).
- P2PNet: VGG16-bn to conv5_3, a stride-8 FPN merge of conv4_3 and conv5_3 (256 ch) and
  P2PNet's two branches (four 3x3 convs of 256 ch each, four anchor points per cell).

Logits are controlled: each net's output convs are scaled, on two synthetic tissue
tiles, so that scores vary between anchors by ``SPREAD`` (logit std) around a bias
``prior`` and box offsets by ``BOX_SPREAD``; "sparse" priors give tens to hundreds of
candidates a tile (as a trained detector on cell-dense tissue), "dense" ones put every
anchor above the threshold (the worst case for decoding and NMS).
"""

from __future__ import annotations

import torch
from torch import nn

#: logit standard deviation between anchors of the scoring convs
SPREAD = 2.0
#: YOLOv7's default anchors (px) per scale, strides 8, 16, 32
V7_ANCHORS = ((12, 16, 19, 36, 40, 28), (36, 75, 76, 55, 72, 146),
              (142, 110, 192, 243, 459, 401))
LBC_CLASSES = 6  # pathasst-lbc-yolov7.yaml


#: logit standard deviation between anchors of box offsets / point offsets (px)
BOX_SPREAD = 0.5


def _tissue(px: int, n: int = 2) -> torch.Tensor:
    """``n`` synthetic H&E tissue tiles, (n, 3, px, px) in [0, 1]."""
    import numpy as np

    from wsi_assist.synthetic import default_slide

    spec = default_slide(4096, 3072)
    tiles = np.stack([spec.render(1000.0 + 400 * i, 1400.0, px, px) for i in range(n)])
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255


def calibrate(net: nn.Module, px: int,
              targets: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Set each conv's weights and bias so that its output channels have the mean and
    standard deviation over anchors ``targets[conv]`` on synthetic tissue."""
    outs: dict[nn.Conv2d, torch.Tensor] = {}
    hooks = [c.register_forward_hook(lambda m, i, o: outs.__setitem__(m, o))
             for c in targets]
    with torch.no_grad():
        net.eval()(_tissue(px))
        for h in hooks:
            h.remove()
        for conv, (mean, std) in targets.items():
            o = (outs[conv] - conv.bias.view(1, -1, 1, 1)).transpose(0, 1).flatten(1)
            gain = std / o.std(1).clamp_min(1e-8)
            conv.weight.mul_(gain.view(-1, 1, 1, 1))
            conv.bias.copy_(mean - gain * o.mean(1))


def _darknet() -> nn.Module:
    import timm

    return timm.create_model("cs3darknet_s", pretrained=False, features_only=True,
                             out_indices=(2, 3, 4))


def _grid(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs, ys], -1).reshape(1, h * w, 2).to(torch.float32)


class YoloRows(nn.Module):
    """YOLOv5/v7 Detect in eval mode: ``(cat(z, 1), feature maps)``, z (B, 3*H*W, 5+nc)."""

    def __init__(self, nc: int = LBC_CLASSES, prior: float = -5.0) -> None:
        super().__init__()
        self.body, self.nc = _darknet(), nc
        ch = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        self.m = nn.ModuleList(nn.Conv2d(c, 3 * (5 + nc), 1) for c in ch)
        mean, std = torch.zeros(3, 5 + nc), torch.full((3, 5 + nc), SPREAD)
        mean[:, 4], std[:, :4] = prior, BOX_SPREAD
        self.register_buffer("anchors", torch.tensor(V7_ANCHORS, dtype=torch.float32
                                                     ).view(3, 1, 3, 1, 2))
        calibrate(self, 640, {conv: (mean.flatten(), std.flatten()) for conv in self.m})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z, maps = [], []
        for k, f in enumerate(self.body(x)):
            f = self.m[k](f)
            b, _, h, w = f.shape
            maps.append(f)
            p = f.view(b, 3, 5 + self.nc, h * w).permute(0, 1, 3, 2).sigmoid()
            xy = (p[..., :2] * 2 - 0.5 + _grid(h, w)) * self.strides[k]
            wh = (p[..., 2:4] * 2) ** 2 * self.anchors[k].view(1, 3, 1, 2)
            z.append(torch.cat([xy, wh, p[..., 4:]], -1).reshape(b, -1, 5 + self.nc))
        return torch.cat(z, 1), maps


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.SiLU())


class YoloColumns(nn.Module):
    """YOLOv8's Detect in export form: (B, 4+nc, N) x, y, w, h (px), class scores."""

    def __init__(self, nc: int = LBC_CLASSES, prior: float = -5.0, reg_max: int = 16
                 ) -> None:
        super().__init__()
        self.body, self.nc, self.reg_max = _darknet(), nc, reg_max
        ch = self.body.feature_info.channels()
        self.strides = self.body.feature_info.reduction()
        c2, c3 = max(16, ch[0] // 4, 4 * reg_max), max(ch[0], min(nc, 100))
        self.box = nn.ModuleList(nn.Sequential(_conv_bn(c, c2), _conv_bn(c2, c2),
                                               nn.Conv2d(c2, 4 * reg_max, 1)) for c in ch)
        self.cls = nn.ModuleList(nn.Sequential(_conv_bn(c, c3), _conv_bn(c3, c3),
                                               nn.Conv2d(c3, nc, 1)) for c in ch)
        self.register_buffer("bins", torch.arange(reg_max, dtype=torch.float32))
        cls = (torch.full((nc,), prior), torch.full((nc,), SPREAD))
        box = (-0.8 * self.bins.repeat(4), torch.full((4 * reg_max,), BOX_SPREAD))
        calibrate(self, 640, {**{s[-1]: cls for s in self.cls},  # small boxes: bins'
                              **{s[-1]: box for s in self.box}})  # logits fall with distance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, scores = [], []
        for k, f in enumerate(self.body(x)):
            b, _, h, w = f.shape
            d = self.box[k](f).view(b, 4, self.reg_max, h * w).softmax(2)
            lt_rb = (d * self.bins.view(1, 1, -1, 1)).sum(2)  # (B, 4, N) grid units
            centre = (_grid(h, w)[0].T + 0.5).unsqueeze(0)  # (1, 2, N)
            x0y0, x1y1 = centre - lt_rb[:, :2], centre + lt_rb[:, 2:]
            boxes.append(torch.cat([(x0y0 + x1y1) / 2, x1y1 - x0y0], 1) * self.strides[k])
            scores.append(self.cls[k](f).flatten(2).sigmoid())
        return torch.cat([torch.cat(boxes, 2), torch.cat(scores, 2)], 1)


def _branch(c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(256, c_out, 3, padding=1))


class P2PNetVgg(nn.Module):
    """P2PNet's layout: ``{'pred_logits': (B, N, K+1), 'pred_points': (B, N, 2)}``."""

    def __init__(self, k: int = 4, background_bias: float = 6.0) -> None:
        super().__init__()
        from torchvision.models import vgg16_bn

        feats = vgg16_bn(weights=None).features
        self.c4, self.c5 = feats[:33], feats[33:43]  # conv4_3 (stride 8), conv5_3 (16)
        self.lat4, self.lat5 = nn.Conv2d(512, 256, 1), nn.Conv2d(512, 256, 1)
        self.smooth = nn.Conv2d(256, 256, 3, padding=1)
        self.reg, self.cls, self.k = _branch(4 * 2), _branch(4 * (k + 1)), k
        prior = torch.zeros(4, k + 1)
        prior[:, k] = background_bias  # background last
        calibrate(self, 224, {self.reg[-1]: (torch.zeros(8), torch.full((8,), 2.0)),  # px
                              self.cls[-1]: (prior.flatten(), torch.full((4 * (k + 1),),
                                                                         SPREAD))})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c4 = self.c4(x)
        c5 = self.c5(c4)
        f = self.smooth(self.lat4(c4) + nn.functional.interpolate(self.lat5(c5),
                                                                   size=c4.shape[-2:]))
        b, _, h, w = f.shape
        anchors = (_grid(h, w).view(1, -1, 1, 2) * 8 + torch.tensor(
            [[2.0, 2], [6, 2], [2, 6], [6, 6]])).reshape(1, -1, 2)
        points = anchors + self.reg(f).permute(0, 2, 3, 1).reshape(b, -1, 2)
        logits = self.cls(f).permute(0, 2, 3, 1).reshape(b, -1, self.k + 1)
        return {"pred_logits": logits, "pred_points": points}


def _seeded(net: type[nn.Module], **kwargs: float) -> nn.Module:
    torch.manual_seed(0)  # the same random weights run to run
    return net(**kwargs)


def yolov7_sparse() -> nn.Module:
    return _seeded(YoloRows, prior=-5.0)


def yolov7_dense() -> nn.Module:
    return _seeded(YoloRows, prior=3.0)


def yolov8_sparse() -> nn.Module:
    return _seeded(YoloColumns, prior=-6.0)


def yolov8_dense() -> nn.Module:
    return _seeded(YoloColumns, prior=3.0)


def p2pnet_her2() -> nn.Module:
    return _seeded(P2PNetVgg, k=4)
