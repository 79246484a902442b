"""FINN's build steps on every golden model or on test models, up to the dataflow partition.

FINN is too large for the test environment, so this runs from a separate one
(finn-plus, the maintained FINN fork, about 6 GB with torch):

    python -m venv finn-venv && finn-venv/bin/pip install finn-plus==1.6.1 psutil
    finn-venv/bin/python scripts/check_finn.py [NAME ...] [--builder NAME ...]
        [--channels-first] [--round-half-even] [--keep DIR]

Each golden model is exported by bnfold in a subprocess of the Python that has
bnfold and TensorFlow (``--exporter``, by default the one the venv was made
from), then FINN's own build steps run on it in order: ``step_qonnx_to_finn``,
``step_tidy_up``, ``step_streamline``, ``step_convert_to_hw``,
``step_minimize_bit_width_initial``, ``step_create_dataflow_partition``. After
each, the model is executed on the golden inputs and compared with the stored
QKeras outputs. ``--round-half-even`` adds ``bnfold.finn.step_round_half_to_even``
after ``step_qonnx_to_finn``, as a FINN user would through ``inject_steps_after``.

``--builder`` takes test models of ``tests/builders.py`` too (``builders.by_name``:
``unet_decoder``, ``quantizer-ternary``, ...): one run of the exporter Python builds
each, saves it as an .h5 file and writes what this check reads of a golden model's
files (its source quantizers; sample inputs on their grids, as ``make_golden.py``
makes them, with the QKeras outputs of the model read back) in a scratch directory,
from which it goes through the same steps.

``--keep DIR`` leaves the exports, the recorded test models and FINN's model after
each step (``<name>_build/<step>.onnx``) in DIR.

The table printed (Markdown) gives per model the furthest step passed, the
maximum difference after each step, the ops ``step_convert_to_hw`` made hardware
layers of (and those it left), and why the next step stopped; ``--json`` also
keeps each output's difference after the last step that ran.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

REPOSITORY = Path(__file__).resolve().parent.parent
GOLDEN = REPOSITORY / "golden"
# Every golden model (the golden directory is the list).
MODEL_NAMES = tuple(sorted(path.stem for path in GOLDEN.glob("*.h5")))
# Samples a test model is checked on, and the seed of their values.
BUILDER_SAMPLES = 32
BUILDER_SEED = 15
STEPS = (
    "step_qonnx_to_finn",
    "step_tidy_up",
    "step_streamline",
    "step_convert_to_hw",
    "step_minimize_bit_width_initial",
    "step_create_dataflow_partition",
)


def _load_finn():
    """FINN's build steps, importable without Vivado.

    ``finn.builder.build_dataflow_steps`` imports ``finn.xsi.SimEngine``, which
    looks for Vivado to build its RTL simulator; no step up to the dataflow
    partition simulates RTL, so a placeholder stands in for it. FINN's settings
    are those its command line would make (``initialize_dummy_settings``).
    """
    import finn.util.settings
    import finn.xsi

    finn.util.settings.initialize_dummy_settings()
    finn.xsi.SimEngine = None
    import finn.builder.build_dataflow_steps as steps
    from finn.builder.build_dataflow_config import DataflowBuildConfig
    from finn.core.onnx_exec import execute_onnx
    from qonnx.core.modelwrapper import ModelWrapper

    return steps, DataflowBuildConfig, execute_onnx, ModelWrapper


def _load_bnfold_finn():
    """``bnfold.finn`` by its path: the bnfold package itself imports TensorFlow, not here."""
    spec = importlib.util.spec_from_file_location(
        "bnfold_finn", REPOSITORY / "src" / "bnfold" / "finn.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_exporter(exporter: str, arguments: list[str]) -> None:
    """Run ``exporter`` with this checkout's bnfold; a failure raises with its last error line."""
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY / "src"))
    finished = subprocess.run(
        [exporter, *arguments], capture_output=True, text=True, env=environment
    )
    if finished.returncode:
        lines = finished.stderr.strip().splitlines() or [f"exit status {finished.returncode}"]
        raise RuntimeError(lines[-1])


def export(name: str, source: Path, directory: Path, exporter: str, channels_first: bool) -> Path:
    """Export model ``name`` of ``source`` (golden files) with bnfold, in the Python that has it."""
    sources = json.loads((source / f"{name}.json").read_text())["source_quantizers"]
    output = directory / f"{name}.onnx"
    command = ["-m", "bnfold.export", str(source / f"{name}.h5"), "-o", str(output)]
    for quantizer in sources:
        command += ["--input-quantizer", quantizer if isinstance(quantizer, str) else "float"]
    if channels_first:
        command.append("--channels-first")
    _run_exporter(exporter, command)
    return output


def record_builders(names: list[str], directory: Path) -> None:
    """Build and save test models in ``directory``, with the parts of golden files read here.

    Run by the exporter Python. Each model's .h5 file, its source quantizers
    (``<name>.json``), and sample inputs on their grids with the outputs of the model
    read back from the file (``<name>.npz``), as ``make_golden.py`` makes them. A
    model that fails to build, save or load gets ``<name>.error`` instead, its error.
    Weights come from a fixed seed; a published model (``builders.PUBLISHED_BUILDERS``)
    is the file ``tests/test_published.py`` saves (``builders.save_published``: its own
    seed, batch normalization statistics randomized, fitted one short epoch).
    """
    sys.path.insert(0, str(REPOSITORY / "tests"))
    import bnfold
    import builders
    import golden_records
    import make_golden
    from bnfold.keras import keras

    for name in names:
        keras.backend.clear_session()
        keras.utils.set_random_seed(BUILDER_SEED)  # the same weights on every run
        try:
            path = directory / f"{name}.h5"
            if name in builders.PUBLISHED_BUILDERS:
                builders.save_published(name, path)  # the file tests/test_published.py saves
                sources = [builders.INPUT_QUANTIZER]
            else:
                model, sources = builders.by_name(name)
                model.save(path)
            saved = bnfold.load_model(path)
            rng = np.random.default_rng(BUILDER_SEED)
            inputs = make_golden.sample_inputs(saved, tuple(sources), BUILDER_SAMPLES, rng)
            outputs = golden_records.keras_outputs(saved, inputs)
            arrays = {f"input/{n}": values for n, values in inputs.items()}
            arrays |= {f"output/{n}": values for n, values in outputs.items()}
            (directory / f"{name}.npz").write_bytes(golden_records.npz_bytes(arrays))
            (directory / f"{name}.json").write_text(json.dumps({"source_quantizers": sources}))
        except Exception as error:
            message = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            (directory / f"{name}.error").write_text(message)


def record_in_exporter(names: list[str], directory: Path, exporter: str) -> None:
    """Record the test models ``names`` in ``directory`` with one run of the exporter Python."""
    if names:
        _run_exporter(exporter, [__file__, "--record", str(directory), *names])


def _channels_first(model, name: str) -> bool:
    layout = model.get_tensor_layout(name)
    return layout is not None and len(layout) > 2 and layout[1] == "C"


def differences(model, execute_onnx, inputs, expected, layouts) -> dict[str, float]:
    """Per output, the largest difference from QKeras's over all samples, one sample a run."""
    inputs_cf, outputs_cf = layouts
    worst = {tensor.name: 0.0 for tensor in model.graph.output}
    for sample in range(len(inputs[0])):
        feed = {}
        for tensor, values, first in zip(model.graph.input, inputs, inputs_cf, strict=True):
            value = values[sample : sample + 1]
            feed[tensor.name] = np.moveaxis(value, -1, 1) if first else value
        results = execute_onnx(model, feed)
        for tensor, values, first in zip(model.graph.output, expected, outputs_cf, strict=True):
            result = results[tensor.name]
            result = np.moveaxis(result, 1, -1) if first else result
            reference = values[sample : sample + 1]
            difference = float(np.max(np.abs(result.reshape(reference.shape) - reference)))
            worst[tensor.name] = max(worst[tensor.name], difference)
    return worst


def check(name: str, source: Path, arguments, finn, workspace: Path) -> dict:
    """FINN's steps on model ``name`` of ``source``: how far it gets, the differences after each."""
    steps, config_class, execute_onnx, wrapper = finn
    result = {"model": name, "steps": {}, "furthest": "export", "stopped": ""}
    recording_error = source / f"{name}.error"
    if recording_error.is_file():
        result["stopped"] = f"export: {recording_error.read_text()}"
        return result
    try:
        path = export(name, source, workspace, arguments.exporter, arguments.channels_first)
    except RuntimeError as error:
        result["stopped"] = f"export: {error}"
        return result
    model = wrapper(str(path))
    recorded = np.load(source / f"{name}.npz")
    input_names = [key.removeprefix("input/") for key in recorded.files if key.startswith("input/")]
    output_names = [
        key.removeprefix("output/") for key in recorded.files if key.startswith("output/")
    ]
    inputs = [recorded[f"input/{n}"] for n in sorted(input_names, key=_order(model.graph.input))]
    expected = [
        recorded[f"output/{n}"] for n in sorted(output_names, key=_order(model.graph.output))
    ]
    layouts = (
        [_channels_first(model, t.name) for t in model.graph.input],
        [_channels_first(model, t.name) for t in model.graph.output],
    )
    config = config_class(
        output_dir=str(workspace / f"{name}_build"),
        generate_outputs=[],
        verify_steps=[],
        save_intermediate_models=True,
    )
    sequence = list(STEPS)
    if arguments.round_half_even:
        sequence.insert(1, "step_round_half_to_even")
        rounding = _load_bnfold_finn().step_round_half_to_even
    for step in sequence:
        function = rounding if step == "step_round_half_to_even" else getattr(steps, step)
        try:
            model = function(model, config)
        except Exception as error:
            result["stopped"] = f"{step}: {type(error).__name__}: {str(error).splitlines()[0]}"
            if arguments.verbose:
                traceback.print_exc()
            break
        result["furthest"] = step
        if arguments.keep:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            model.save(str(Path(config.output_dir) / f"{step}.onnx"))
        if step == "step_convert_to_hw":
            result["hardware"] = hardware_summary(model)
        # The partition step returns the partition alone; its parent computes the model.
        parent = Path(config.output_dir) / "intermediate_models" / "dataflow_parent.onnx"
        executed = wrapper(str(parent)) if step == STEPS[-1] else model
        try:
            per_output = differences(executed, execute_onnx, inputs, expected, layouts)
            result["outputs"] = per_output
            difference = max(per_output.values())
        except Exception as error:
            difference = f"not executable ({type(error).__name__})"
            if arguments.verbose:
                traceback.print_exc()
        result["steps"][step] = difference
    if result["furthest"] == STEPS[-1]:
        result["partition_nodes"] = sum(_is_hardware(n) for n in model.graph.node)
    return result


def hardware_summary(model) -> str:
    """The op types FINN made hardware layers of, and those it left as they were."""
    hardware = Counter(n.op_type for n in model.graph.node if _is_hardware(n))
    left = Counter(n.op_type for n in model.graph.node if not _is_hardware(n))
    text = ", ".join(f"{count} {op}" for op, count in sorted(hardware.items())) or "none"
    if left:
        text += "; left: " + ", ".join(f"{count} {op}" for op, count in sorted(left.items()))
    return text


def _is_hardware(node) -> bool:
    return node.domain.startswith("finn.custom_op.fpgadataflow")


def _order(values):
    names = [tensor.name for tensor in values]
    return lambda name: names.index(name) if name in names else len(names)


# FINN's longer messages, shortened for the table.
_ABBREVIATIONS = (
    ("FINNUserError: Unsupported/unmapped layer(s) found in between FINN operators, ", ""),
    ("Complete list of unmapped nodes:", "unmapped:"),
)


def _versions() -> str:
    packages = ("finn-plus", "qonnx", "onnx", "onnxruntime")
    return ", ".join(f"{p} {importlib.metadata.version(p)}" for p in packages)


def table(results: list[dict], arguments) -> str:
    short = {step: step.removeprefix("step_") for step in STEPS}
    short["step_round_half_to_even"] = "round_half_to_even"
    columns = [s for s in ("step_qonnx_to_finn", "step_round_half_to_even", *STEPS[1:])]
    columns = [c for c in columns if any(c in r["steps"] for r in results)] or list(STEPS)
    header = ["model", "furthest step", *(short[c] for c in columns)]
    header += ["hardware layers after convert_to_hw", "stopped by"]
    lines = [
        f"check_finn.py, {datetime.date.today().isoformat()}: {_versions()}; "
        f"channels_first={arguments.channels_first}, round_half_even={arguments.round_half_even}",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for result in results:
        cells = [result["model"], short.get(result["furthest"], result["furthest"])]
        for column in columns:
            value = result["steps"].get(column, "")
            cells.append(f"{value:g}" if isinstance(value, float) else str(value))
        cells.append(result.get("hardware", ""))
        stopped = result["stopped"].replace("|", "/")
        for long, short_text in _ABBREVIATIONS:
            stopped = stopped.replace(long, short_text)
        cells.append(stopped[:200])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", metavar="NAME", help="golden models (default: all, unless --builder)"
    )
    parser.add_argument(
        "--builder",
        nargs="+",
        default=[],
        metavar="NAME",
        help="test models of tests/builders.py (builders.by_name), after the golden ones",
    )
    parser.add_argument("--channels-first", action="store_true", help="export NCHW interfaces")
    parser.add_argument(
        "--round-half-even",
        action="store_true",
        help="add bnfold.finn.step_round_half_to_even after step_qonnx_to_finn",
    )
    parser.add_argument(
        "--exporter",
        # A venv made from the Python that has bnfold: that Python.
        default=getattr(sys, "_base_executable", None) or "python3",
        help="the Python with bnfold and TensorFlow that exports the models",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="work in DIR and leave there the exports and FINN's models after each step",
    )
    parser.add_argument("--verbose", action="store_true", help="print tracebacks")
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # run by the exporter
    arguments = parser.parse_args(argv)
    if arguments.record:
        record_builders(arguments.models, arguments.record)
        return 0
    golden = arguments.models or ([] if arguments.builder else list(MODEL_NAMES))
    finn = _load_finn()
    results = []
    if arguments.keep:
        arguments.keep.mkdir(parents=True, exist_ok=True)
    kept = contextlib.nullcontext(arguments.keep) if arguments.keep else None
    with kept or tempfile.TemporaryDirectory(prefix="check_finn_") as directory:
        workspace = Path(directory)
        built = workspace / "builders"
        built.mkdir(exist_ok=True)
        record_in_exporter(arguments.builder, built, arguments.exporter)
        models = [(name, GOLDEN) for name in golden] + [(n, built) for n in arguments.builder]
        for name, source in models:
            results.append(check(name, source, arguments, finn, workspace))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(table(results, arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
