"""Golden regression suite: what bnfold computes today from golden/*.h5 against the stored files.

Each model is read from its file with ``bnfold.load_model``, populated, unfolded
and exported once per session. The folded, unfolded and QONNX outputs on the
stored inputs must equal the stored outputs exactly; the types, populated
quantizers, quantized weights and ONNX summary must equal the stored ones. A
failure lists each difference as model, layer, field, old value, new value.
The comparison is ``golden_records.compare``, the one ``make_golden.py --check``
prints.
"""

from __future__ import annotations

import difflib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

import bnfold
import golden_records
import make_golden
from bnfold.export import pipeline, standard_ops
from bnfold.export.strip import strip
from bnfold.export.verify import (
    FLOAT_TOLERANCE,
    ONE_SESSION,
    qonnx_outputs,
    sample_inputs,
)
from bnfold.fixedpoint import FixedPoint
from bnfold.folding import folded_layer_type
from bnfold.graph import iter_layers
from bnfold.unfold import unfold_model
from golden_records import GOLDEN, MODEL_NAMES, Difference, Recording

MAX_MODEL_BYTES = 1_000_000


@dataclass
class Golden:
    """One golden model: its stored files, the model read from them, and a fresh recording."""

    name: str
    stored: Recording
    loaded: golden_records.Loaded
    fresh: Recording

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return golden_records.stored_inputs(self.stored)


def _load(name: str, directory: Path = GOLDEN) -> Golden:
    stored = golden_records.read(name, directory)
    loaded = golden_records.load(directory / f"{name}.h5", stored.record["source_quantizers"])
    fresh = golden_records.recording(loaded, golden_records.stored_inputs(stored))
    return Golden(name, stored, loaded, fresh)


@pytest.fixture(scope="session")
def golden() -> Callable[[str], Golden]:
    """Each model loaded and exported at most once per session, when a test first needs it."""
    cache: dict[str, Golden] = {}

    def get(name: str) -> Golden:
        if name not in cache:
            cache[name] = _load(name)
        return cache[name]

    return get


def _assert_none(differences: list[Difference]) -> None:
    assert not differences, (
        "bnfold no longer computes what golden/ records. If the change is deliberate, "
        "regenerate with scripts/make_golden.py and explain it in the commit.\n"
        + golden_records.format_differences(differences)
    )


def _only(arrays: dict[str, np.ndarray], *kinds: str) -> dict[str, np.ndarray]:
    return {key: value for key, value in arrays.items() if key.split("/")[0] in kinds}


def _outputs(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"output/{name}": values for name, values in outputs.items()}


# ------------------------------------------------------------------------ the files


def test_make_golden_builds_exactly_the_listed_models():
    assert tuple(make_golden.MODELS) == MODEL_NAMES


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_files_exist_and_model_is_small(name):
    files = golden_records.paths(name)
    assert [kind for kind, path in files.items() if not path.is_file()] == []
    assert files["h5"].stat().st_size < MAX_MODEL_BYTES
    record = json.loads(files["json"].read_text())
    assert {"source_quantizers", "accumulators", "bias_quantizers"} <= set(record)
    assert len(record["source_quantizers"]) == len(record["inputs"])


# ------------------------------------------------------------------------ the outputs


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_folded_outputs_equal_stored(golden, name):
    model = golden(name)
    stored, fresh = (_only(r.arrays, "output") for r in (model.stored, model.fresh))
    _assert_none(golden_records.compare_arrays(name, stored, fresh, "folded"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unfolded_outputs_equal_stored_bit_for_bit(golden, name):
    model = golden(name)
    unfolded = golden_records.keras_outputs(model.loaded.unfolded, model.inputs)
    stored = _only(model.stored.arrays, "output")
    _assert_none(golden_records.compare_arrays(name, stored, _outputs(unfolded), "unfolded"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_qonnx_execution_equals_stored_bit_for_bit(golden, name):
    """Outputs computed in fixed point exactly; those after a float op within the tolerance."""
    model = golden(name)
    executed = _outputs(golden_records.onnx_outputs(model.loaded.onnx_model, model.inputs))
    stored = _only(model.stored.arrays, "output")
    metadata = {entry.key: entry.value for entry in model.loaded.onnx_model.metadata_props}
    float_outputs = json.loads(metadata.get("bnfold.float_tail", '{"outputs": []}'))["outputs"]
    for output in float_outputs:
        key = f"output/{output}"
        reference = stored.pop(key)
        allowed = FLOAT_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
        assert np.max(np.abs(executed.pop(key) - reference)) <= allowed, output
    _assert_none(golden_records.compare_arrays(name, stored, executed, "qonnx"))


def test_float_tail_golden_models_have_float_outputs_and_untyped_layers():
    record = json.loads(golden_records.paths("tutorial_cnn")["json"].read_text())
    assert record["accumulators"]["output"]["untyped"].startswith("its kernel is not fixed")
    summary = json.loads(golden_records.paths("softmax_batchnorm_mlp")["onnx.json"].read_text())
    assert summary["metadata"]["bnfold.float_tail"]["outputs"] == ["softmax"]
    assert summary["op_counts"]["Softmax"] == 1


# ------------------------------------------------------------------------ one Keras rebuild


def _unfolding_first(model, *args, **kwargs):
    """The strip stage as the export ran it before unfolding moved into it: on a copy of the
    model unfolded by ``unfold_model`` (a Keras rebuild more)."""
    return strip(unfold_model(model), *args, **kwargs)


def _with_folded_classes(exported, folded):
    """``exported`` with the layer classes of ``folded`` in its ``bnfold.layers`` table.

    Stripping an unfolded model names its classes (QConv2D, ...); the export names
    the user's (QConv2DBatchnorm, ...), as it did before when it told strip which
    layers had been folded. Any other difference in the table stays.
    """
    folded_classes = {
        path: (entry.plain.__name__, entry.folded)
        for path, layer in iter_layers(folded)
        if (entry := folded_layer_type(layer)) is not None
    }
    renamed = onnx.ModelProto()
    renamed.CopyFrom(exported)
    (entry,) = [entry for entry in renamed.metadata_props if entry.key == "bnfold.layers"]
    layers = json.loads(entry.value)
    for layer in layers:
        plain, folded_class = folded_classes.get(layer["layer"], (None, None))
        if layer["class"] == plain:
            layer["class"] = folded_class
    entry.value = json.dumps(layers)
    return renamed


# tf2onnx numbers the names it makes up (``MatMul_Gemm__6``) from one counter per process.
_GENERATED_NUMBER = re.compile(r"__(\d+)")


def _generated_names_renumbered(exported):
    """A copy of ``exported`` with tf2onnx's name numbers renumbered in order of appearance,
    wherever a tensor or node name appears: the graph, its annotations, the metadata.

    The initializers and value infos, sets that tf2onnx lists in an order its names
    decide, are sorted by their new names.
    """
    numbers: dict[str, int] = {}

    def rename(text: str) -> str:
        return _GENERATED_NUMBER.sub(
            lambda match: f"__{numbers.setdefault(match.group(1), len(numbers))}", text
        )

    renamed = onnx.ModelProto()
    renamed.CopyFrom(exported)
    graph = renamed.graph
    for node in graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
        for entry in node.metadata_props:
            entry.value = rename(entry.value)
    for named in (*graph.initializer, *graph.input, *graph.output, *graph.value_info):
        named.name = rename(named.name)
    for annotation in graph.quantization_annotation:
        annotation.tensor_name = rename(annotation.tensor_name)
        for entry in annotation.quant_parameter_tensor_names:
            entry.value = rename(entry.value)
    for entry in renamed.metadata_props:
        entry.value = rename(entry.value)
    for field in ("initializer", "value_info"):
        entries = sorted(getattr(graph, field), key=lambda entry: entry.name)
        graph.ClearField(field)
        getattr(graph, field).extend(entries)
    return renamed


def _text_diff(expected, actual, lines: int = 40) -> str:
    diff = difflib.unified_diff(
        str(expected).splitlines(), str(actual).splitlines(), "unfolding first", "one rebuild"
    )
    return "\n".join(list(diff)[:lines])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_rebuild_exports_the_file_unfolding_first_exported(golden, name, monkeypatch):
    """The export unfolds while it strips; the whole file, graph, initializers bit for bit and
    metadata, is the one it wrote when it unfolded the model first."""
    model = golden(name)
    monkeypatch.setattr(pipeline, "strip", _unfolding_first)
    unfolding_first = bnfold.export_onnx(
        GOLDEN / f"{name}.h5", source_quantizers=model.loaded.source_quantizers
    )
    expected = _generated_names_renumbered(
        _with_folded_classes(unfolding_first, model.loaded.folded)
    )
    actual = _generated_names_renumbered(model.loaded.onnx_model)
    assert actual.SerializeToString() == expected.SerializeToString(), _text_diff(expected, actual)


# ------------------------------------------------------------------------ types and metadata


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantized_weights_equal_stored(golden, name):
    model = golden(name)
    stored, fresh = (_only(r.arrays, "kernel", "bias") for r in (model.stored, model.fresh))
    _assert_none(golden_records.compare_arrays(name, stored, fresh))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_quantizers_accumulators_and_bias_quantizers_equal_stored(golden, name):
    model = golden(name)
    _assert_none(golden_records.compare_json(name, model.stored.record, model.fresh.record, "json"))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_onnx_summary_equals_stored(golden, name):
    model = golden(name)
    stored, fresh = model.stored.onnx_summary, model.fresh.onnx_summary
    _assert_none(golden_records.compare_json(name, stored, fresh, "onnx"))


def test_jet_tagging_mlp_needed_populating():
    record = json.loads(golden_records.paths("jet_tagging_mlp")["json"].read_text())
    assert all(layer.get("bias_quantizer", None) is None for layer in record["layers"].values())
    assert all(record["bias_quantizers"].values())


# ------------------------------------------------------------------------ tampered copies


def _copy(name: str, directory: Path) -> None:
    for path in golden_records.paths(name).values():
        shutil.copy(path, directory / path.name)


def _recheck(name: str, directory: Path) -> list[Difference]:
    """What the tests would report for the copy of model ``name`` in ``directory``."""
    model = _load(name, directory)
    return golden_records.compare(name, model.stored, model.fresh)


def _find(differences: list[Difference], layer: str, field: str) -> Difference:
    found = [d for d in differences if (d.layer, d.field) == (layer, field)]
    assert found, golden_records.format_differences(differences)
    return found[0]


def test_changed_folded_weight_is_reported_by_layer_and_field(tmp_path):
    _copy("jet_tagging_mlp", tmp_path)
    stored_kernel = golden_records.read("jet_tagging_mlp").arrays["kernel/fc2"]
    index = tuple(np.argwhere(stored_kernel != 0)[0])
    with h5py.File(tmp_path / "jet_tagging_mlp.h5", "r+") as file:
        kernel = file["model_weights/fc2/fc2/kernel:0"]
        kernel[index] = -kernel[index]  # the folded, quantized value changes sign
    differences = _recheck("jet_tagging_mlp", tmp_path)
    difference = _find(differences, "fc2", "kernel")
    value, where = stored_kernel[index].item(), list(map(int, index))
    assert difference.old == f"{value!r} at {where}"
    assert difference.new == f"{-value!r} (1 of 2048 values differ)"
    with pytest.raises(AssertionError, match=r"jet_tagging_mlp: layer fc2, field kernel: old "):
        _assert_none(differences)


def test_changed_quantizer_is_reported_by_layer_and_field(tmp_path):
    _copy("nested_blocks", tmp_path)
    with h5py.File(tmp_path / "nested_blocks.h5", "r+") as file:
        config = json.loads(file.attrs["model_config"])
        block = next(e for e in config["config"]["layers"] if e["config"]["name"] == "res_block")
        conv = next(e for e in block["config"]["layers"] if e["config"]["name"] == "conv_b")
        conv["config"]["kernel_quantizer"]["config"]["bits"] = 5
        file.attrs["model_config"] = json.dumps(config)
    differences = _recheck("nested_blocks", tmp_path)
    stored = _find(differences, "res_block/conv_b", "json.layers.kernel_quantizer")
    assert (stored.old, stored.new) == (
        '"quantized_bits(6,0,1,alpha=1)"',
        '"quantized_bits(5,0,1,alpha=1)"',
    )
    exported = _find(differences, "res_block/conv_b", "onnx.layers.quant.kernel.bitwidth")
    assert (exported.old, exported.new) == ("6", "5")


@pytest.mark.parametrize("change", ["value", "key"])
def test_changed_metadata_in_stored_summary_is_reported(golden, tmp_path, change):
    _copy("jet_tagging_mlp", tmp_path)
    path = golden_records.paths("jet_tagging_mlp", tmp_path)["onnx.json"]
    summary = json.loads(path.read_text())
    metadata = summary["layers"]["fc1"]["mac"]["MatMul"]
    if change == "value":
        metadata["bnfold.accumulator_hls"] = "ap_fixed<99,9>"
    else:
        metadata["bnfold.accumulator_type"] = metadata.pop("bnfold.accumulator")
    path.write_text(golden_records.json_text(summary, sort_keys=True))
    stored = golden_records.read("jet_tagging_mlp", tmp_path).onnx_summary
    fresh = golden("jet_tagging_mlp").fresh.onnx_summary
    differences = golden_records.compare_json("jet_tagging_mlp", stored, fresh, "onnx")
    field = "onnx.layers.mac.MatMul.bnfold."
    if change == "value":
        difference = _find(differences, "fc1", f"{field}accumulator_hls")
        assert difference.old == '"ap_fixed<99,9>"' and difference.new.startswith('"ap_fixed<')
        assert len(differences) == 1
    else:
        assert _find(differences, "fc1", f"{field}accumulator_type").new == "<missing>"
        assert _find(differences, "fc1", f"{field}accumulator").old == "<missing>"
        assert len(differences) == 2


# ------------------------------------------------------------------------ the script and the CLI


def test_check_rebuilds_identically_and_prints_each_difference(tmp_path, capsys):
    """make_golden.py --check rebuilds the model: only the tampered value differs."""
    _copy("jet_tagging_mlp", tmp_path)
    path = golden_records.paths("jet_tagging_mlp", tmp_path)["json"]
    record = json.loads(path.read_text())
    record["bias_quantizers"]["fc3"] = "quantized_bits(4,0,1)"
    tampered = golden_records.json_text(record)
    path.write_text(tampered)
    code = make_golden.main(["--check", "--directory", str(tmp_path), "jet_tagging_mlp"])
    printed = capsys.readouterr().out.splitlines()
    assert code == 1
    assert len(printed) == 1
    assert printed[0].startswith(
        'jet_tagging_mlp: layer fc3, field json.bias_quantizers: old "quantized_bits(4,0,1)", new '
    )
    assert path.read_text() == tampered  # --check writes nothing


def test_writing_is_refused_off_the_reference_stack(tmp_path, monkeypatch, capsys):
    """golden/ records the reference stack's numbers; another stack may only --check."""
    monkeypatch.setattr(
        make_golden.supported_versions,
        "mismatches",
        lambda row: ["tf2onnx: README 1.17.0, installed 1.16.1"],
    )
    with pytest.raises(SystemExit) as exit_info:
        make_golden.main(["--directory", str(tmp_path), "jet_tagging_mlp"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "py3.11-reference" in error and "tf2onnx: README 1.17.0, installed 1.16.1" in error
    assert not any(tmp_path.iterdir())


def test_readme_quick_start_exports_the_jet_tagging_mlp(tmp_path, capsys):
    from bnfold.export.__main__ import main

    output = tmp_path / "jet_tagging_mlp.onnx"
    model = str(GOLDEN / "jet_tagging_mlp.h5")
    code = main([model, "-o", str(output), "--input-quantizer", "quantized_bits(8,3,1,alpha=1)"])
    assert code == 0, capsys.readouterr().err
    assert output.is_file()
    assert "verified: QONNX equals QKeras" in capsys.readouterr().out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_session_executor_equals_qonnx_executor_bit_for_bit(golden, name):
    """Verify's one onnxruntime session computes what qonnx's executor computes, float parts
    and tensors read by float layers included, on and off the input grids."""
    model = golden(name)
    onnx_model = model.loaded.onnx_model
    assert standard_ops.as_standard_ops(onnx_model) is not None
    types = [FixedPoint.from_quantizer(q) for q in model.loaded.source_quantizers]
    inputs = sample_inputs(model.loaded.folded, types, 16, seed=1, off_grid=16)
    metadata = {entry.key: entry.value for entry in onnx_model.metadata_props}
    tail = json.loads(metadata.get("bnfold.float_tail", '{"boundaries": []}'))
    tensors = [boundary["tensor"] for boundary in tail["boundaries"]]
    by_qonnx = qonnx_outputs(onnx_model, inputs, tensors)
    in_one_session = qonnx_outputs(onnx_model, inputs, tensors, one_session=True)
    for expected, actual in zip(by_qonnx, in_one_session, strict=True):
        np.testing.assert_array_equal(actual, expected)
    assert json.loads(metadata["bnfold.verification"])["executor"] == ONE_SESSION
