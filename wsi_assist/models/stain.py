"""The built-in, weight-free sub-model: colour deconvolution and nucleus candidates.

Ruifrok & Johnston (2001) stain vectors for haematoxylin, eosin and DAB (the H-E-DAB
matrix, which holds both the H&E and the H-DAB pairs) turn RGB into per-stain optical
density. Nucleus candidates are local maxima (max-pool trick) of Gaussian-smoothed
haematoxylin density above a floor; each is called DAB-positive when the smoothed DAB
density at its centre exceeds ``dab_threshold`` and is at least ``dab_fraction`` of
H + DAB (purple H&E nuclei project partly onto the DAB vector, brown ones mostly). The output has a fixed number of
points per tile (padding has score 0), so the module exports to ONNX with a dynamic
batch axis and runs through the same runtime as any other sub-model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

#: Ruifrok-Johnston stain OD vectors (rows: haematoxylin, eosin, DAB), as in scikit-image.
RJ_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
MEASUREMENTS = ("Haematoxylin OD", "Eosin OD", "DAB OD")


def stain_matrix(vectors: tuple[tuple[float, float, float], ...] = RJ_HED) -> torch.Tensor:
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


class StainNuclei(nn.Module):
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
        self.register_buffer("od_to_stain", stain_matrix(), persistent=False)
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
