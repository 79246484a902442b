"""The annotate stage's node metadata: every node names the Keras layer it computes."""

from __future__ import annotations

from collections import Counter

import pytest
from onnx import helper

import bnfold
import builders


def _layer(node) -> str | None:
    return next((e.value for e in node.metadata_props if e.key == "bnfold.layer"), None)


@pytest.fixture(scope="module")
def unet_decoder_export():
    model, sources = builders.by_name("unet_decoder")
    return bnfold.export_onnx(model, source_quantizers=sources)


def test_upsampling_resize_names_its_layer(unet_decoder_export):
    """tf2onnx names an UpSampling2D's Resize outside every layer scope (``Resize__29``)."""
    resizes = {
        helper.get_attribute_value(next(a for a in node.attribute if a.name == "mode")): _layer(
            node
        )
        for node in unet_decoder_export.graph.node
        if node.op_type == "Resize"
    }
    assert resizes == {b"nearest": "up_nearest", b"linear": "up_bilinear"}


def test_every_node_names_its_keras_layer(unet_decoder_export):
    """Quant nodes on the layer's weights and activation; the input's layout Transpose on
    the first convolution (it reads NHWC, ONNX's Conv NCHW), the side output's on the
    convolution before it; the Permute to channels-first cancels against the layout."""
    mac = {"Quant": 3, "Conv": 1, "Relu": 1}
    expected = Counter({("Quant", "image"): 1, ("MaxPool", "down"): 1})
    for layer in ("enc", "mid", "dec", "side"):
        expected.update({(op, layer): count for op, count in mac.items()})
    expected.update(
        {
            ("Transpose", "enc"): 1,
            ("Transpose", "side"): 1,
            ("Resize", "up_nearest"): 1,
            ("Resize", "up_bilinear"): 1,
            ("Concat", "merge_skip"): 1,
            ("Slice", "crop"): 1,
            ("Pad", "pad"): 1,
            ("Reshape", "flat"): 1,
            ("Reshape", "side_flat"): 1,
            ("Quant", "head"): 2,
            ("MatMul", "head"): 1,
            ("Add", "head"): 1,
        }
    )
    found = Counter((node.op_type, _layer(node)) for node in unet_decoder_export.graph.node)
    assert found == expected
