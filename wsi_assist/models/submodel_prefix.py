"""Move a float model's preprocessing into its graph, so tiles go in as uint8.

For a sub-model whose spec takes float input, a small prefix graph (uint8 NHWC RGB ->
channel order -> layout -> ``(v / scale - mean) / std`` -> dtype) is joined to the model
with ``onnx.compose``. The runtime then hands the tile stream's uint8 batches over as they
are: no normalisation pass in numpy, and 4x less data to copy to a GPU. Models the join
does not work for keep numpy preprocessing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_assist.models.submodel_spec import SubmodelSpec, affine

log = logging.getLogger(__name__)
INPUT = "tiles_uint8"


def _prefix_graph(spec: SubmodelSpec, out_name: str, opset: int, ir_version: int) -> Any:
    """uint8 NHWC RGB ``tiles_uint8`` -> the model's input ``out_name``, as an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    inp = spec.input
    shape = (1, 3, 1, 1) if inp.layout == "NCHW" else (1, 1, 1, 3)
    gain, bias = (a.reshape(shape) for a in affine(inp.mean, inp.std, inp.scale))
    inits = [numpy_helper.from_array(gain, "pre_gain"), numpy_helper.from_array(bias, "pre_bias")]
    nodes = [helper.make_node("Cast", [INPUT], ["pre_f"], to=TensorProto.FLOAT)]
    cur = "pre_f"
    if inp.channel_order == "BGR":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "pre_bgr"))
        nodes.append(helper.make_node("Gather", [cur, "pre_bgr"], ["pre_c"], axis=3))
        cur = "pre_c"
    if inp.layout == "NCHW":
        nodes.append(helper.make_node("Transpose", [cur], ["pre_t"], perm=[0, 3, 1, 2]))
        cur = "pre_t"
    nodes.append(helper.make_node("Mul", [cur, "pre_gain"], ["pre_m"]))
    last = out_name if inp.dtype == "float32" else "pre_a"
    nodes.append(helper.make_node("Add", ["pre_m", "pre_bias"], [last]))
    if inp.dtype == "float16":
        nodes.append(helper.make_node("Cast", [last], [out_name], to=TensorProto.FLOAT16))
    elem = TensorProto.FLOAT if inp.dtype == "float32" else TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes, "wsi_assist_preprocess",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(out_name, elem, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=ir_version)


def fused_model(model_path: Path, spec: SubmodelSpec) -> bytes | None:
    """The model with its preprocessing in the graph (uint8 NHWC input), or None."""
    import onnx
    from onnx import compose

    if spec.input.dtype == "uint8":
        return None
    try:
        model = onnx.load(str(model_path))
        inits = {i.name for i in model.graph.initializer}
        name = next(i.name for i in model.graph.input if i.name not in inits)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     17)
        prefix = _prefix_graph(spec, "pre_out", opset, model.ir_version)
        merged = compose.merge_models(prefix, model, io_map=[("pre_out", name)])
        return merged.SerializeToString()
    except (ValueError, TypeError, KeyError, StopIteration, RuntimeError,
            onnx.checker.ValidationError) as e:  # graphs compose cannot join
        log.info("%s: preprocessing stays in numpy (%s)", model_path, e)
        return None
