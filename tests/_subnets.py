"""Tiny sub-model networks for the tests (random weights, or hand-set ones with a known answer).

Importable as ``_subnets`` (pytest puts tests/ on sys.path) so ``exporters.submodels``
can build them from a ``module:function`` factory.
"""

from __future__ import annotations

import math

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


# -- a weight-free point detector with a known answer (the built-in until 0.1) --------------
# Ruifrok-Johnston colour deconvolution and local maxima of smoothed haematoxylin density:
# nucleus candidates with per-point stain densities, exported as a point-detection sub-model
# (dynamic tile size, uint8 NHWC input, a fixed number of points per tile, padding scored 0).

#: Ruifrok-Johnston stain OD vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
RJ_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
MEASUREMENTS = ("Haematoxylin OD", "Eosin OD", "DAB OD")


def rj_matrix(vectors: tuple[tuple[float, float, float], ...] = RJ_HED) -> torch.Tensor:
    """The OD -> stain-density matrix: inverse of the row-normalised stain vectors."""
    m = torch.tensor(vectors, dtype=torch.float64)
    m = m / m.norm(dim=1, keepdim=True)
    return torch.linalg.inv(m).to(torch.float32)


def gaussian_kernel(sigma_px: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma_px))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    return k / k.sum()


class StainPoints(nn.Module):
    """uint8 NHWC RGB tiles -> points (B,P,2), scores (B,P), labels (B,P), measurements (B,P,3).

    Points are (x, y) in tile pixels from the tile's top-left corner (pixel centres at
    +0.5); the score is the smoothed haematoxylin OD at the point; label 1 = DAB-positive.
    Padding rows (beyond the peaks found) are all zero.
    """

    # Buffers registered in __init__ (declared here: nn.Module.__getattr__ is Tensor | Module).
    od_to_stain: torch.Tensor
    kx: torch.Tensor
    ky: torch.Tensor

    def __init__(self, sigma_px: float = 3.0, min_distance_px: int = 6,
                 min_density: float = 0.05, dab_threshold: float = 0.2,
                 dab_fraction: float = 0.6, max_points: int = 512) -> None:
        super().__init__()
        if sigma_px <= 0 or min_distance_px < 1 or max_points < 1:
            raise ValueError("sigma_px > 0, min_distance_px >= 1 and max_points >= 1 required")
        self.min_distance_px = int(min_distance_px)
        self.min_density = float(min_density)
        self.dab_threshold = float(dab_threshold)
        self.dab_fraction = float(dab_fraction)
        self.max_points = int(max_points)
        k = gaussian_kernel(sigma_px)
        self.register_buffer("od_to_stain", rj_matrix(), persistent=False)
        self.register_buffer("kx", k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), persistent=False)

    def densities(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 -> (B,3,H,W) stain densities (H, E, DAB), clipped at 0."""
        rgb = tiles.to(torch.float32)
        od = -torch.log10((rgb + 1.0) / 256.0)
        dens = torch.matmul(od, self.od_to_stain).clamp(min=0.0)
        return dens.permute(0, 3, 1, 2)

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur per channel, edges replicated."""
        rx, ry = self.kx.shape[-1] // 2, self.ky.shape[-2] // 2
        x = F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="replicate"), self.kx, groups=3)
        return F.conv2d(F.pad(x, (0, 0, ry, ry), mode="replicate"), self.ky, groups=3)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, w = tiles.shape[0], tiles.shape[2]
        dens = self.smooth(self.densities(tiles))
        hema = dens[:, 0:1]
        d = self.min_distance_px
        pooled = F.max_pool2d(hema, kernel_size=2 * d + 1, stride=1, padding=d)
        peak = (hema >= pooled) & (hema > self.min_density)
        score_map = torch.where(peak, hema, torch.zeros_like(hema)).reshape(b, -1)
        k = self.max_points
        scores, idx = torch.topk(score_map, k, dim=1)
        xs = (idx % w).to(torch.float32) + 0.5
        ys = torch.div(idx, w, rounding_mode="floor").to(torch.float32) + 0.5
        points = torch.stack([xs, ys], dim=2)
        flat = dens.reshape(b, 3, -1)
        meas = torch.gather(flat, 2, idx.unsqueeze(1).expand(b, 3, k)).permute(0, 2, 1)
        valid = scores > 0  # padding rows are all zero, whatever order topk left them in
        points = points * valid.unsqueeze(2)
        meas = meas * valid.unsqueeze(2)
        hema_c, dab = meas[:, :, 0], meas[:, :, 2]
        positive = (dab > self.dab_threshold) & (dab >= self.dab_fraction * (hema_c + dab))
        labels = (positive & valid).to(torch.int64)
        return points, scores, labels, meas


def stain_points() -> nn.Module:
    return StainPoints().eval()


def stain_points_spec(name: str = "points") -> dict:
    """The point-detection spec of :class:`StainPoints` (0.5 um/px, any tile size)."""
    return {
        "name": name, "task": "point-detection", "model": f"{name}.onnx",
        "input": {"tile_px": None, "mpp": 0.5, "channel_order": "RGB", "layout": "NHWC",
                  "dtype": "uint8", "background": "bright"},
        "output": {"classes": ["DAB-negative nucleus", "DAB-positive nucleus"],
                   "colors": [[40, 80, 200], [150, 75, 0]], "score_threshold": 0.15,
                   "nms_radius_um": 4.0, "measurement_names": list(MEASUREMENTS),
                   "draw_radius_um": 3.0},
        "scores": {
            "nucleus_density_per_mm2": {
                "kind": "density", "numerator": ["DAB-negative nucleus",
                                                 "DAB-positive nucleus"],
                "definition": "nucleus candidates per mm^2 of analysed tissue"},
            "dab_positive_percent": {
                "kind": "ratio", "numerator": ["DAB-positive nucleus"],
                "denominator": ["DAB-negative nucleus", "DAB-positive nucleus"], "scale": 100,
                "definition": "DAB-positive / all nucleus candidates x 100"}},
        "extra_outputs": ["measurements"],
    }
