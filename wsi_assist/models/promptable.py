"""Promptable segmenters (SAM-style): an image encoder per tile, then a prompt decoder per
point prompt, the prompts being another sub-model's detections (e.g. nucleus centroids).

The decoder has SAM's ONNX export signature (``image_embeddings``, ``point_coords``,
``point_labels``, ``mask_input``, ``has_mask_input``, ``orig_im_size`` -> ``masks``,
``iou_predictions``, ``low_res_masks``). Each prompt is one positive point plus SAM's
padding point (label -1), coordinates in encoder-input pixels; ``orig_im_size`` is the
encoder input size, so masks come back in those pixels. When the decoder's batch axes
are dynamic all prompts of a tile go in one call, else one call per prompt (SAM's own
export). Of several masks per prompt the one with the highest predicted IoU is kept; its
connected part under the prompt becomes the cell outline (level-0 px, simplified).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from wsi_assist.errors import ModelError
from wsi_assist.files import FileCache
from wsi_assist.models.mask_polygons import outline_at
from wsi_assist.models.pathclip import file_sha256
from wsi_assist.models.submodel_decode import activate
from wsi_assist.models.submodel_spec import (
    SubmodelSpec,
    check_against_model,
    check_image_input,
    load_spec,
)
from wsi_assist.models.submodels import Submodel, create_session
from wsi_assist.stream import TileBatch
from wsi_assist.tiling import TileGrid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompts:
    """Point prompts in level-0 px, each with the class name of the detection it is,
    grouped by the grid row of the tile it falls in."""

    points: np.ndarray  # (N, 2) float64
    names: list[str]
    by_row: dict[int, np.ndarray]


@dataclass(frozen=True)
class Outline:
    """One prompted outline (level-0 px), its predicted IoU and its prompt's index."""

    polygon: shapely.Polygon
    iou: float
    prompt: int


class PromptableSubmodel:
    """A promptable segmenter: its encoder (a :class:`Submodel`, preprocessing and all)
    and its prompt decoder session."""

    def __init__(self, spec: SubmodelSpec, encoder: Submodel, decoder: Any,
                 encoder_batch1: bool = False) -> None:
        """``encoder_batch1``: the encoder file takes one image per call (SAM's export)."""
        self.spec, self.encoder, self.decoder = spec, encoder, decoder
        self.sha256 = file_sha256(spec.model_path)
        ins = {i.name: i for i in decoder.get_inputs()}
        self.batched = all(not isinstance(ins[n].shape[0], int) for n in
                           ("image_embeddings", "point_coords", "point_labels", "mask_input"))
        self.enc_batch1 = encoder_batch1
        self.output_names = [o.name for o in decoder.get_outputs()]

    @classmethod
    def load(cls, spec: SubmodelSpec, providers: list[str]) -> PromptableSubmodel:
        """Both sessions, each checked: the encoder against ``input``, the decoder by
        SAM's input and output names."""
        if spec.encoder_path is None:
            raise ModelError(f"{spec.spec_path}: promptable-segmentation needs 'encoder'")
        enc_spec = dataclasses.replace(spec, model_path=spec.encoder_path, task="segmentation",
                                       encoder_path=None, prompts=None, scores={})
        enc_session = create_session(spec.encoder_path, providers)
        check_image_input(enc_spec, enc_session, str(spec.encoder_path))
        out = enc_session.get_outputs()[0]
        if len(out.shape) != 4:
            raise ModelError(f"{spec.encoder_path}: an image encoder's first output is the "
                             f"(B, C, h, w) embedding; {out.name!r} is {list(out.shape)}")
        from wsi_assist.models.submodel_prefix import fused_model

        blob = fused_model(spec.encoder_path, enc_spec)
        fused = create_session(spec.encoder_path, providers, blob) if blob else None
        decoder = create_session(spec.model_path, providers)
        check_against_model(spec, decoder)
        return cls(spec, Submodel(enc_spec, enc_session, fused), decoder,
                   enc_session.get_inputs()[0].shape[0] == 1)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Image embeddings (B, C, h, w) of prepared tiles (one by one for a batch-1
        encoder such as SAM's)."""
        if self.enc_batch1 and len(x) > 1:
            return np.concatenate([self.encode(x[i:i + 1]) for i in range(len(x))])
        return next(iter(self.encoder.run(x).values()))

    def decode(self, emb: np.ndarray, points: np.ndarray, size: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Masks (K, H, W) bool and predicted IoUs (K,) for ``points`` (K, 2) in encoder
        px, given one tile's embedding (1, C, h, w)."""
        k = len(points)
        coords = np.zeros((k, 2, 2), np.float32)
        coords[:, 0] = points
        labels = np.tile(np.array([[1.0, -1.0]], np.float32), (k, 1))
        h, w = emb.shape[2:]
        fixed = {"has_mask_input": np.zeros(1, np.float32),
                 "orig_im_size": np.array([size, size], np.float32)}
        if self.batched:
            feeds = [{"image_embeddings": np.repeat(emb, k, axis=0), "point_coords": coords,
                      "point_labels": labels,
                      "mask_input": np.zeros((k, 1, 4 * h, 4 * w), np.float32), **fixed}]
        else:
            mask_in = np.zeros((1, 1, 4 * h, 4 * w), np.float32)
            feeds = [{"image_embeddings": emb, "point_coords": coords[i:i + 1],
                      "point_labels": labels[i:i + 1], "mask_input": mask_in, **fixed}
                     for i in range(k)]
        masks, ious = [], []
        for feed in feeds:
            out = dict(zip(self.output_names, self.decoder.run(self.output_names, feed),
                           strict=True))
            m, iou = np.asarray(out["masks"]), np.asarray(out["iou_predictions"], np.float32)
            best = iou.argmax(axis=1)
            masks.append(m[np.arange(len(m)), best])
            ious.append(iou[np.arange(len(m)), best])
        o = self.spec.output
        probs = activate(np.concatenate(masks)[:, None], o.activation)[:, 0]
        return probs > o.score_threshold, np.concatenate(ious)


def assign_prompts(grid: TileGrid, points: np.ndarray, names: list[str],
                   scores: np.ndarray | None, max_per_tile: int) -> Prompts:
    """Each prompt in the tile that owns it (:meth:`TileGrid.owners`; dropped when in
    none), at most ``max_per_tile`` per tile, highest ``scores`` first."""
    by_row: dict[int, np.ndarray] = {}
    if len(points) and len(grid.coords):
        row = grid.owners(points)
        order = np.argsort(-scores, kind="stable") if scores is not None else np.arange(
            len(points))
        order = order[row[order] >= 0]
        for r in np.unique(row[order]):
            by_row[int(r)] = order[row[order] == r][:max_per_tile]
    return Prompts(points=points, names=names, by_row=by_row)


def run_promptable(batches: Iterable[TileBatch], tiles: TileGrid, keys: np.ndarray,
                   model: PromptableSubmodel, prompts: Prompts, mpp_tolerance: float = 0.1
                   ) -> list[Outline]:
    """The encoder over the streamed ``tiles`` (each a grid tile grown by a halo), the
    decoder over the prompts of each one's grid tile (``keys``: its row in the grid the
    prompts were assigned on); one outline per prompt whose mask is not empty."""
    size = model.encoder.model_px(tiles.tile_px, tiles.delivered_mpp)
    want, got = model.spec.input.mpp, tiles.delivered_mpp * tiles.tile_px / size
    if want is not None and abs(got - want) > mpp_tolerance * want:
        log.warning("sub-model %s expects %.3g um/px, its haloed tiles give it %.3g um/px; "
                    "outlines may be off (set tiling.target_mpp, the spec's input.mpp or "
                    "prompts.halo_um)", model.spec.name, want, got)
    scale = tiles.size_l0 / size  # level-0 px per encoder px
    simplify_px = model.spec.output.simplify_um / tiles.mpp
    min_px2 = model.spec.output.min_area_um2 / tiles.mpp**2
    out: list[Outline] = []
    for batch in batches:
        emb = model.encode(model.encoder.prepare(batch.tiles, size))
        for t, i in enumerate(batch.index.tolist()):
            idx = prompts.by_row.get(int(keys[i]))
            if idx is None or not len(idx):
                continue
            corner = tiles.coords[i].astype(np.float64)
            local = (prompts.points[idx] - corner) / scale
            masks, ious = model.decode(emb[t:t + 1], local.astype(np.float32), size)
            for j, (mask, iou) in enumerate(zip(masks, ious, strict=True)):
                poly = outline_at(mask, tuple(local[j]), scale, tuple(corner), simplify_px)
                if poly is not None and poly.area >= min_px2:
                    out.append(Outline(poly, float(iou), int(idx[j])))
    return out


_PROMPTABLE: FileCache[PromptableSubmodel] = FileCache()


def get_promptable(spec_path: str | Path, providers: list[str]) -> PromptableSubmodel:
    """The loaded, checked promptable segmenter of this spec, once per process (again
    when the spec, encoder or decoder file changes)."""
    path = Path(spec_path).resolve()
    spec = load_spec(path)
    files = (path, spec.model_path, *([spec.encoder_path] if spec.encoder_path else []))
    return _PROMPTABLE.get((tuple(providers),), files,
                           lambda: PromptableSubmodel.load(spec, providers))
