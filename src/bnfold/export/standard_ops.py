"""Run a QONNX graph in one onnxruntime session, its Quant nodes written as standard ops.

qonnx's executor runs every node in a session of its own, which costs more
than the arithmetic on models of a few hundred nodes. Its Quant is
(``qonnx.custom_op.general.intquant.int_quant``), in float32::

    y = x / scale + zeropt
    y = where(y > max_int, max_int, y); y = where(y < min_int, min_int, y)
    y = round(y)    # ROUND: half to even, as ONNX's Round; FLOOR, CEIL likewise;
                    # HALF_UP: sign(y) * floor(abs(y) + 0.5)
    out = (y - zeropt) * scale

with ``min_int``/``max_int`` from bitwidth, signed and narrow, and a 1-bit
signed Quant giving ``where(y >= 0, 1, -1)`` instead of clipping and rounding.
A BipolarQuant is ``where(x >= 0, 1, -1) * scale``. The same steps as ONNX ops
(Div, Add, Min, Max, Round, Sub, Mul; Abs, Floor, Sign for HALF_UP; Greater,
Equal, Or, Where for the bipolar step) compute the same float32 values: each is
one correctly rounded float32 operation, the clamp bounds are the float32
values of the integer bounds (which is what qonnx compares against), and
Min/Max replace ``where`` exactly for numbers. ``tests/test_standard_ops.py``
checks the two executors agree, ties and values beyond the range included, and
``tests/test_golden.py`` on every golden model.

A graph this cannot express (another custom op, another rounding mode, a bit
width that is not a constant, an opset before Round existed) gives None, and
the caller runs qonnx's executor instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnfold.export.annotate import QONNX_DOMAIN

# ONNX's Round (half to even) appeared in opset 11.
_FIRST_OPSET = 11
_ROUNDING_OPS = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}


def _integer_bounds(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """The smallest and largest integer of a Quant (QONNX's definition)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def _attributes(node: onnx.NodeProto) -> dict[str, object]:
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _constants(constants: list[onnx.TensorProto], prefix: str) -> Callable[[str, float], str]:
    """A function adding a float32 constant named under ``prefix`` and returning its name."""

    def constant(name: str, value: float) -> str:
        constants.append(numpy_helper.from_array(np.array(value, np.float32), f"{prefix}.{name}"))
        return f"{prefix}.{name}"

    return constant


def _bipolar(source: str, target: str, prefix: str, constant: Callable) -> list[onnx.NodeProto]:
    """``where(source >= 0, 1, -1)`` as qonnx computes it (NaN gives -1); ONNX has
    GreaterOrEqual only from opset 12, so ``>`` or ``==``."""
    zero = constant("zero", 0.0)
    return [
        helper.make_node("Greater", [source, zero], [f"{prefix}.positive"]),
        helper.make_node("Equal", [source, zero], [f"{prefix}.zero_valued"]),
        helper.make_node(
            "Or", [f"{prefix}.positive", f"{prefix}.zero_valued"], [f"{prefix}.non_negative"]
        ),
        helper.make_node(
            "Where",
            [f"{prefix}.non_negative", constant("one", 1.0), constant("minus_one", -1.0)],
            [target],
        ),
    ]


def _rounded(
    mode: str, source: str, target: str, prefix: str, constant: Callable
) -> list[onnx.NodeProto] | None:
    """``source`` rounded to an integer as the Quant's rounding mode says; None for a mode
    written here in no ops."""
    if mode in _ROUNDING_OPS:
        return [helper.make_node(_ROUNDING_OPS[mode], [source], [target])]
    if mode != "HALF_UP":
        return None
    # qonnx: sign(y) * floor(abs(y) + 0.5), each step one float32 operation, as here.
    return [
        helper.make_node("Abs", [source], [f"{prefix}.magnitude"]),
        helper.make_node("Add", [f"{prefix}.magnitude", constant("half", 0.5)], [f"{prefix}.up"]),
        helper.make_node("Floor", [f"{prefix}.up"], [f"{prefix}.rounded_magnitude"]),
        helper.make_node("Sign", [source], [f"{prefix}.sign"]),
        helper.make_node("Mul", [f"{prefix}.sign", f"{prefix}.rounded_magnitude"], [target]),
    ]


def _expand_quant(
    node: onnx.NodeProto, bits: float, constants: list[onnx.TensorProto]
) -> list[onnx.NodeProto] | None:
    """The standard ops computing ``node`` (a Quant of constant bit width ``bits``)."""
    attributes = _attributes(node)
    signed, narrow = bool(attributes.get("signed", 1)), bool(attributes.get("narrow", 0))
    mode = attributes.get("rounding_mode", b"ROUND")
    mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
    x, scale, zeropt = node.input[:3]
    prefix = f"{node.output[0]}.standard"
    constant = _constants(constants, prefix)
    nodes = [
        helper.make_node("Div", [x, scale], [f"{prefix}.scaled"]),
        helper.make_node("Add", [f"{prefix}.scaled", zeropt], [f"{prefix}.shifted"]),
    ]
    if bits == 1 and signed:
        nodes += _bipolar(f"{prefix}.shifted", f"{prefix}.rounded", prefix, constant)
    elif float(bits).is_integer():
        low, high = _integer_bounds(int(bits), signed, narrow)
        rounded = _rounded(mode, f"{prefix}.clipped", f"{prefix}.rounded", prefix, constant)
        if rounded is None:
            return None
        nodes += [
            helper.make_node("Min", [f"{prefix}.shifted", constant("high", high)], [f"{prefix}.a"]),
            helper.make_node("Max", [f"{prefix}.a", constant("low", low)], [f"{prefix}.clipped"]),
            *rounded,
        ]
    else:
        return None
    nodes.append(helper.make_node("Sub", [f"{prefix}.rounded", zeropt], [f"{prefix}.unshifted"]))
    nodes.append(helper.make_node("Mul", [f"{prefix}.unshifted", scale], [node.output[0]]))
    return nodes


def _expand_bipolar_quant(
    node: onnx.NodeProto, constants: list[onnx.TensorProto]
) -> list[onnx.NodeProto]:
    """The standard ops computing a BipolarQuant: ``where(x >= 0, 1, -1) * scale``."""
    x, scale = node.input[:2]
    prefix = f"{node.output[0]}.standard"
    return [
        *_bipolar(x, f"{prefix}.bipolar", prefix, _constants(constants, prefix)),
        helper.make_node("Mul", [f"{prefix}.bipolar", scale], [node.output[0]]),
    ]


def as_standard_ops(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` with each Quant node written as standard ops, or None if it cannot be.

    Returns:
        A model of standard ops only, computing what qonnx's executor computes
        on ``model`` value for value; None for a graph this cannot express.
    """
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx", 0)) < _FIRST_OPSET:
        return None
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    constants: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain in ("", "ai.onnx"):
            nodes.append(node)
            continue
        bitwidth = initializers.get(node.input[3]) if len(node.input) == 4 else None
        if node.domain == QONNX_DOMAIN and node.op_type == "BipolarQuant":
            expanded = _expand_bipolar_quant(node, constants)
        elif node.domain == QONNX_DOMAIN and node.op_type == "Quant" and bitwidth is not None:
            expanded = _expand_quant(node, float(numpy_helper.to_array(bitwidth)), constants)
        else:
            return None
        if expanded is None:
            return None
        nodes += expanded
    standard = onnx.ModelProto()
    standard.CopyFrom(model)
    del standard.graph.node[:]
    standard.graph.node.extend(nodes)
    # The bit widths are now in the bounds; onnxruntime warns about unread initializers.
    read = {name for node in nodes for name in node.input}
    kept_initializers = [tensor for tensor in standard.graph.initializer if tensor.name in read]
    del standard.graph.initializer[:]
    standard.graph.initializer.extend([*kept_initializers, *constants])
    kept = [entry for entry in standard.opset_import if entry.domain in ("", "ai.onnx")]
    del standard.opset_import[:]
    standard.opset_import.extend(kept)
    return standard


def run(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], tensors: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Run a model of standard ops once in onnxruntime; its outputs and ``tensors`` by name.

    Graph optimizations are off, so every node runs as written (as qonnx's
    executor runs it), with no fusion changing the order of a float sum.
    """
    import onnxruntime

    outputs = [value.name for value in model.graph.output]
    wanted = [name for name in tensors if name not in outputs]
    if wanted:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in wanted
        )
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    names = outputs + wanted
    return dict(zip(names, session.run(names, feed), strict=True))
