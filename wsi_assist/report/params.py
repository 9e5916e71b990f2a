"""Settings of the report stage (config section ``report``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportParams:
    """What annotations and reports contain (config section ``report``)."""

    include_tiles: bool = False
    min_region_um2: float = 50000.0
    exclude_uncertain: bool = True
    heatmap_classes: tuple[str, ...] | None = None
    max_heatmaps: int = 6
    image_px: int = 900
    gallery_per_class: int = 2
    empty_tile_tissue: float = 0.5
    pdf: bool = True

    def __post_init__(self) -> None:
        if not self.min_region_um2 >= 0:
            raise ValueError(f"min_region_um2 must be >= 0, got {self.min_region_um2!r}")
        if self.max_heatmaps < 0:
            raise ValueError(f"max_heatmaps must be >= 0, got {self.max_heatmaps!r}")
        if self.image_px < 128:
            raise ValueError(f"image_px must be >= 128, got {self.image_px!r}")
        if self.gallery_per_class < 0:
            raise ValueError(f"gallery_per_class must be >= 0, got "
                             f"{self.gallery_per_class!r}")
        if not 0.0 <= self.empty_tile_tissue <= 1.0:
            raise ValueError(f"empty_tile_tissue must be in 0..1, got "
                             f"{self.empty_tile_tissue!r}")
