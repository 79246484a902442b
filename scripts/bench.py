"""Where bnfold's export time goes, against the QKeras route and the tf2onnx floor.

Usage: python scripts/bench.py [--quick] [--sizes N ...] [--variants conv dense]
                               [--repeats R] [--json PATH]

For each variant (``conv``: 3x3 QConv2DBatchnorm blocks of 16 channels on a
32x32x3 input; ``dense``: QDenseBatchnorm blocks of 64 units on 64 features;
each block followed by ``quantized_relu(4,1)``, bias quantizers empty) and each
N in 8, 32, 128 blocks (``--quick``: 8), this measures side by side:

- bnfold: ``export_onnx(path, out)`` from a saved .h5, as a user runs it
  (verification on), each stage timed through ``on_stage`` (load, populate,
  unfold+strip, convert = tf2onnx, annotate, verify, write). Its time without
  verification is the total less the verify stage, which nothing after depends on;
- the QKeras route a user would take without bnfold: ``qkeras.utils.load_qmodel``,
  ``bn_folding_utils.populate_bias_quantizer_from_accumulator`` (quantizer
  objects), ``bn_folding_utils.unfold_model``, ``tf2onnx.convert.from_keras`` on
  the unfolded QKeras model (quantizer arithmetic inlined), ``onnx.save``.
  A step that raises is recorded with its error and the route has no total;
  what QKeras skips without raising (dense layers) is recorded as a note;
- the floor: ``tf2onnx.convert.from_keras`` on the same network without any
  quantizer (Conv2D or Dense with bias, then ReLU: the inference network), and
  the same after loading that float network from its .h5 file;
- the unavoidable part of any export from the user's file: Keras's load of the
  same folded .h5 (the QKeras route's load step) plus the floor's tf2onnx.

In fresh interpreters it also times ``python -m bnfold.export --help``; the
CLI on the smallest golden model from process start to exit (wall and CPU
seconds, and the seconds spent importing, from ``python -X importtime``); and
the batch mode: 20 golden-size models (copies of the golden files) exported by
one call, against 20 separate calls. It prints the tables and the issue's
targets, and writes every number as JSON.

Why one subprocess per (variant, N): all three routes of one size run in the
same process, one after the other, so machine noise hits them alike and their
ratios are meaningful; and each size starts from a fresh interpreter so that
memory is measured per size. Each worker first runs every route once on a
one-block model, so that imports and TensorFlow's first-call set-up are not
charged to whichever route happens to run first.

Why RSS sampling for memory: tracemalloc sees only Python allocations, not
TensorFlow's or onnxruntime's C++ heaps, and ``ru_maxrss`` only ever grows
within a process. A thread reads the resident set size from /proc every 5 ms;
each measurement reports its peak RSS above the RSS when it started (memory a
previous route freed but kept mapped can make this an underestimate). The
worker's ``ru_maxrss`` is recorded too.

Times are wall-clock seconds, the minimum over ``--repeats`` runs (the minimum
is the run least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = (8, 32, 128)
QUICK_SIZES = (8,)
VARIANTS = ("conv", "dense")
INPUT_QUANTIZER = "quantized_bits(8,3,1,alpha=1)"
KERNEL_QUANTIZER = "quantized_bits(4,0,1,alpha=1)"
ACTIVATION = "quantized_relu(4,1)"
# bnfold.export.STAGES; written out so that this process need not import TensorFlow.
BNFOLD_STAGES = ("load", "populate", "unfold+strip", "convert", "annotate", "verify", "write")
QKERAS_STEPS = ("load", "populate", "unfold", "tf2onnx", "write")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1 << 20


class RssSampler:
    """Tracks the peak resident set size of this process from a background thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self._interval = interval
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        """The resident set size now, in bytes (second field of /proc/self/statm)."""
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * PAGE

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._peak = max(self._peak, self.rss())

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def growth(self, result: dict[str, Any]) -> Iterator[None]:
        """Store in ``result["peak_rss_growth_mb"]`` the peak RSS above the starting RSS."""
        start = self.rss()
        self._peak = start
        try:
            yield
        finally:
            self._peak = max(self._peak, self.rss())
            result["peak_rss_growth_mb"] = round((self._peak - start) / MB, 1)


# ---------------------------------------------------------------- worker side


def build_models(variant: str, blocks: int, seed: int = 0) -> tuple[Any, Any]:
    """The folded QKeras model (random batchnorm statistics) and its quantizer-free twin."""
    import numpy as np

    from bnfold.keras import keras, qkeras
    from bnfold.layers import QDenseBatchnorm

    rng = np.random.default_rng(seed)
    shape = (32, 32, 3) if variant == "conv" else (64,)
    folded_input, float_input = keras.Input(shape, name="x"), keras.Input(shape, name="x")
    folded, plain = folded_input, float_input
    for index in range(blocks):
        if variant == "conv":
            layer = qkeras.QConv2DBatchnorm(
                16,
                3,
                padding="same",
                kernel_quantizer=KERNEL_QUANTIZER,
                bias_quantizer=None,
                name=f"conv{index}",
            )
            twin = keras.layers.Conv2D(16, 3, padding="same", name=f"conv{index}")
        else:
            layer = QDenseBatchnorm(
                64, kernel_quantizer=KERNEL_QUANTIZER, bias_quantizer=None, name=f"dense{index}"
            )
            twin = keras.layers.Dense(64, name=f"dense{index}")
        folded = qkeras.QActivation(ACTIVATION, name=f"relu{index}")(layer(folded))
        plain = keras.layers.ReLU(name=f"relu{index}")(twin(plain))
        kernel = layer.kernel
        kernel.assign(rng.normal(0, 0.5, kernel.shape).astype(np.float32))
        channels = layer.batchnorm.moving_mean.shape
        layer.batchnorm.set_weights(
            [
                rng.uniform(0.5, 2.0, channels).astype(np.float32),
                rng.normal(0, 0.5, channels).astype(np.float32),
                rng.normal(0, 0.5, channels).astype(np.float32),
                rng.uniform(0.5, 2.0, channels).astype(np.float32),
            ]
        )
    return keras.Model(folded_input, folded), keras.Model(float_input, plain)


def _signature(model: Any) -> list[Any]:
    from bnfold.keras import tf

    return [tf.TensorSpec(t.shape, tf.float32, name=t.name.split(":")[0]) for t in model.inputs]


def _fresh() -> None:
    """Forget Keras's global state and garbage left by the previous measurement."""
    from bnfold.keras import keras

    keras.backend.clear_session()
    gc.collect()


def run_bnfold(path: Path, out: Path, sampler: RssSampler) -> dict[str, Any]:
    """bnfold's whole export from the .h5 file (the defaults: verified), each stage timed."""
    from bnfold.export import export_onnx

    marks: list[tuple[str, float]] = []
    result: dict[str, Any] = {}
    _fresh()
    with sampler.growth(result):
        start = time.perf_counter()
        exported = export_onnx(
            path,
            out,
            source_quantizers=[INPUT_QUANTIZER],
            on_stage=lambda stage: marks.append((stage, time.perf_counter())),
        )
        end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    result["stages"] = {stage: t1 - t0 for (stage, t0), t1 in zip(marks, ends, strict=True)}
    result["total"] = end - start
    result["nodes"] = len(exported.graph.node)
    return result


def _folded(model: Any) -> list[Any]:
    return [layer for layer in model.layers if type(layer).__name__.endswith("Batchnorm")]


def run_qkeras(path: Path, out: Path, sampler: RssSampler) -> dict[str, Any]:
    """The route without bnfold; stops at the first step that raises and records why.

    QKeras 0.9.0 does not raise on what it cannot do: its populate skips layers
    other than its two folded conv types, and its unfold copies them still
    folded. Both are recorded as notes, since the user finds out only later.
    """
    import onnx
    import tf2onnx

    from bnfold.keras import qkeras
    from bnfold.layers import QDenseBatchnorm

    bn = qkeras.bn_folding_utils
    state: dict[str, Any] = {}
    notes: list[str] = []

    def populate() -> None:
        source = qkeras.quantizers.get_quantizer(INPUT_QUANTIZER)
        with contextlib.redirect_stdout(io.StringIO()):  # qtools prints per unknown layer
            bn.populate_bias_quantizer_from_accumulator(state["model"], [source])
        folded = _folded(state["model"])
        empty = [layer for layer in folded if layer.bias_quantizer is None]
        if empty:
            notes.append(
                f"populate left {len(empty)} of {len(folded)} bias quantizers empty "
                f"({type(empty[0]).__name__})"
            )

    def unfold() -> None:
        state["unfolded"] = bn.unfold_model(state["model"])
        still = _folded(state["unfolded"])
        if still:
            notes.append(f"unfold left {len(still)} {type(still[0]).__name__} layers folded")

    steps: dict[str, Callable[[], None]] = {
        # A user with a QDenseBatchnorm model has the class from QKeras PR #74; ours stands in.
        "load": lambda: state.update(
            model=qkeras.utils.load_qmodel(
                str(path), custom_objects={"QDenseBatchnorm": QDenseBatchnorm}, compile=False
            )
        ),
        "populate": populate,
        "unfold": unfold,
        "tf2onnx": lambda: state.update(
            onnx=tf2onnx.convert.from_keras(
                state["unfolded"], input_signature=_signature(state["unfolded"]), opset=13
            )[0]
        ),
        "write": lambda: onnx.save(state["onnx"], str(out)),
    }
    result: dict[str, Any] = {"stages": {}}
    _fresh()
    with sampler.growth(result):
        start = time.perf_counter()
        for name, step in steps.items():
            begin = time.perf_counter()
            try:
                step()
            except Exception as error:  # record what a user would hit, and go on
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                message = message if len(message) <= 80 else message[:77] + "..."
                result["error"] = f"{name}: {type(error).__name__}: {message}"
                break
            result["stages"][name] = time.perf_counter() - begin
        result["total"] = None if "error" in result else time.perf_counter() - start
    result["notes"] = notes
    if "onnx" in state:
        result["nodes"] = len(state["onnx"].graph.node)
    return result


def run_floor(model: Any, path: Path, sampler: RssSampler) -> dict[str, Any]:
    """tf2onnx on the quantizer-free network: the least any Keras-to-ONNX export costs.

    ``total`` is the conversion alone, as the issue defines the floor; ``with_load``
    adds loading the float model from its .h5 file, which bnfold's total includes.
    """
    import tf2onnx

    from bnfold.keras import keras

    result: dict[str, Any] = {}
    _fresh()
    with sampler.growth(result):
        start = time.perf_counter()
        converted, _ = tf2onnx.convert.from_keras(
            model, input_signature=_signature(model), opset=13
        )
        result["total"] = time.perf_counter() - start
    result["nodes"] = len(converted.graph.node)
    _fresh()
    start = time.perf_counter()
    loaded = keras.models.load_model(path, compile=False)
    tf2onnx.convert.from_keras(loaded, input_signature=_signature(loaded), opset=13)
    result["with_load"] = time.perf_counter() - start
    return result


def _fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the smallest total (the least disturbed), keeping every total seen."""
    done = [run for run in runs if run.get("total") is not None]
    best = dict(min(done, key=lambda run: run["total"]) if done else runs[0])
    best["totals"] = [run.get("total") for run in runs]
    return best


def worker(variant: str, blocks: int, repeats: int) -> dict[str, Any]:
    """Measure every route on one size, in this process; returns the JSON-ready record.

    bnfold runs once, with verification: its time without verification is its
    total less the verify stage (the stages after verify do not depend on it).
    """
    from bnfold.cli import import_tensorflow_quietly

    import_tensorflow_quietly()
    sampler = RssSampler().start()
    record: dict[str, Any] = {
        "variant": variant,
        "blocks": blocks,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as directory:
        folder = Path(directory)
        for size, keep in ((1, False), (blocks, True)):
            folded, plain = build_models(variant, size)
            path, plain_path = folder / f"folded{size}.h5", folder / f"float{size}.h5"
            folded.save(path)
            plain.save(plain_path)
            runs: dict[str, list[dict[str, Any]]] = {"floor": [], "bnfold": [], "qkeras": []}
            for _ in range(repeats if keep else 1):
                runs["floor"].append(run_floor(plain, plain_path, sampler))
                runs["bnfold"].append(run_bnfold(path, folder / "bnfold.onnx", sampler))
                runs["qkeras"].append(run_qkeras(path, folder / "qkeras.onnx", sampler))
            if keep:
                record.update({route: _fastest(found) for route, found in runs.items()})
    sampler.stop()
    bnfold = record["bnfold"]
    bnfold["total_no_verify"] = bnfold["total"] - bnfold["stages"]["verify"]
    load = record["qkeras"]["stages"]["load"]
    record["unavoidable"] = {
        "load": load,
        "tf2onnx": record["floor"]["total"],
        "total": load + record["floor"]["total"],
    }
    record["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    record["load_average_after"] = os.getloadavg()
    return record


# ---------------------------------------------------------------- parent side


def _environment() -> dict[str, str]:
    """This environment with the checkout's src first on the path, for the subprocesses."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def time_help() -> list[float]:
    """Wall time of ``python -m bnfold.export --help``, three times in fresh interpreters."""
    env = _environment()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bnfold.export", "--help"],
            env=env,
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
    return times


SMALLEST_GOLDEN = "softmax_batchnorm_mlp"


def _cli(*arguments: str, importtime: bool = False) -> tuple[float, float, str]:
    """Wall and CPU seconds of one ``python -m bnfold.export`` call, and its stderr."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [*command, "-m", "bnfold.export", *arguments],
        env=_environment(),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        sys.exit(f"bnfold.export {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, done.stderr


def time_startup(repeats: int = 3) -> dict[str, Any]:
    """The CLI on the smallest golden model, process start to exit, and its imports.

    The import time is the sum of the top-level entries of ``-X importtime``, run
    with ``--debug`` (otherwise stderr is silenced while TensorFlow starts).
    """
    golden = ROOT / "golden"
    source = json.loads((golden / f"{SMALLEST_GOLDEN}.json").read_text())["source_quantizers"]
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as directory:
        arguments = [str(golden / f"{SMALLEST_GOLDEN}.h5"), "-o", f"{directory}/out.onnx"]
        arguments += [item for text in source for item in ("--input-quantizer", text)]
        runs = [_cli(*arguments) for _ in range(repeats)]
        wall, _, log = _cli(*arguments, "--debug", importtime=True)
    top_level = re.findall(r"import time:\s+\d+ \|\s+(\d+) \| (?! )\S", log)
    imports = sum(int(microseconds) for microseconds in top_level) / 1e6
    return {
        "model": SMALLEST_GOLDEN,
        "wall": min(run[0] for run in runs),
        "cpu": min(run[1] for run in runs),
        "importtime_wall": wall,
        "imports": imports,
    }


def time_batch(count: int) -> dict[str, Any]:
    """``count`` copies of the golden models: one call for all, against one call each."""
    golden = sorted((ROOT / "golden").glob("*.h5"))
    with tempfile.TemporaryDirectory(prefix="bnfold-bench-") as directory:
        folder = Path(directory)
        (folder / "models").mkdir()
        for index in range(count):
            shutil.copyfile(golden[index % len(golden)], folder / "models" / f"m{index:02d}.h5")
        models = sorted((folder / "models").glob("*.h5"))
        separate = [_cli(str(model), "-o", str(folder / "one.onnx")) for model in models]
        together = _cli(str(folder / "models" / "*.h5"), "-o", str(folder / "out"))
    return {
        "models": count,
        "separate_wall": sum(run[0] for run in separate),
        "separate_cpu": sum(run[1] for run in separate),
        "one_call_wall": together[0],
        "one_call_cpu": together[1],
    }


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import importlib.metadata as metadata

    cpu = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {
        name: metadata.version(name)
        for name in ("tensorflow", "tf-keras", "qkeras", "tf2onnx", "onnx", "qonnx", "onnxruntime")
    }
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * PAGE / (1 << 30), 1),
        "system": platform.platform(),
        "python": platform.python_version(),
        **versions,
    }


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.1f}x"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _markdown(rows: list[list[str]]) -> str:
    lines = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
    return "\n".join("| " + " | ".join(row) + " |" for row in lines)


def tables(records: list[dict[str, Any]]) -> str:
    """The three Markdown tables: bnfold's stages, the routes side by side, the QKeras route."""
    stages = [["model", *BNFOLD_STAGES, "total", "without verify"]]
    routes = [
        [
            "model",
            "bnfold",
            "bnfold without verify",
            "QKeras route",
            "floor (tf2onnx)",
            "unavoidable (QKeras load + tf2onnx)",
            "bnfold / unavoidable",
            "QKeras route / bnfold",
            "ONNX nodes bnfold / QKeras / floor",
            "peak RSS growth MB bnfold / QKeras / floor",
        ]
    ]
    qkeras_steps = [["model", *QKERAS_STEPS, "total", "what went wrong"]]
    for record in records:
        name = f"{record['variant']} N={record['blocks']}"
        bnfold, qkeras, floor = record["bnfold"], record["qkeras"], record["floor"]
        unavoidable = record["unavoidable"]
        total, without = bnfold["total"], bnfold["total_no_verify"]
        stages.append(
            [
                name,
                *(_seconds(bnfold["stages"].get(stage)) for stage in BNFOLD_STAGES),
                _seconds(total),
                _seconds(without),
            ]
        )
        routes.append(
            [
                name,
                _seconds(total),
                _seconds(without),
                "fails" if qkeras["total"] is None else _seconds(qkeras["total"]),
                _seconds(floor["total"]),
                _seconds(unavoidable["total"]),
                f"{_ratio(total, unavoidable['total'])} ({_ratio(without, unavoidable['total'])})",
                f"{_ratio(qkeras['total'], total)} ({_ratio(qkeras['total'], without)})",
                f"{bnfold['nodes']} / {qkeras.get('nodes', '-')} / {floor['nodes']}",
                " / ".join(
                    f"{route['peak_rss_growth_mb']:.0f}" for route in (bnfold, qkeras, floor)
                ),
            ]
        )
        qkeras_steps.append(
            [
                name,
                *(_seconds(qkeras["stages"].get(step)) for step in QKERAS_STEPS),
                _seconds(qkeras["total"]),
                "; ".join([*qkeras["notes"], qkeras.get("error", "")]).strip("; ").replace("|", "/")
                or "-",
            ]
        )
    return "\n\n".join(
        [
            "bnfold's stages (seconds):",
            _markdown(stages),
            "Side by side (seconds; ratios in parentheses: bnfold without verify):",
            _markdown(routes),
            "The QKeras route (seconds):",
            _markdown(qkeras_steps),
        ]
    )


def targets(
    records: list[dict[str, Any]],
    help_seconds: list[float],
    batch: dict[str, Any] | None,
) -> list[str]:
    """The issue's targets, each with the measured value and whether it holds."""
    by_key = {(r["variant"], r["blocks"]): r for r in records}
    best_help = min(help_seconds)
    lines = [f"--help: {best_help:.2f} s (target < 1 s): {_verdict(best_help < 1)}"]
    for variant in VARIANTS:
        at32, at128 = by_key.get((variant, 32)), by_key.get((variant, 128))
        for key, label in (("total", "bnfold"), ("total_no_verify", "bnfold without verify")):
            if at32:
                ratio = at32["bnfold"][key] / at32["unavoidable"]["total"]
                lines.append(
                    f"{variant} N=32: {label} / unavoidable = {ratio:.2f} (target <= 1.6): "
                    + _verdict(ratio <= 1.6)
                )
                qkeras = at32["qkeras"]["total"]
                if qkeras is None:
                    lines.append(f"{variant} N=32: QKeras route fails, no ratio")
                else:
                    speedup = qkeras / at32["bnfold"][key]
                    lines.append(
                        f"{variant} N=32: QKeras route / {label} = {speedup:.1f} "
                        f"(target >= 3): {_verdict(speedup >= 3)}"
                    )
            if at32 and at128:
                growth = at128["bnfold"][key] / at32["bnfold"][key]
                lines.append(
                    f"{variant}: {label} N=128 / N=32 = {growth:.1f} (target <= 4.5): "
                    + _verdict(growth <= 4.5)
                )
    if batch:
        share = batch["one_call_wall"] / batch["separate_wall"]
        lines.append(
            f"{batch['models']} golden models: one call / separate calls = {share:.0%} "
            f"(target <= 40%): {_verdict(share <= 0.4)}"
        )
    return lines


def _verdict(holds: bool) -> str:
    return "holds" if holds else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 8 only")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(SIZES), help="numbers of blocks"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bnfold-bench.json",
        help="where to write the numbers (default: %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per route and size")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--batch", type=int, default=20, metavar="M", help="models in the batch test (0: skip)"
    )
    parser.add_argument(
        "--worker", nargs=3, metavar=("VARIANT", "N", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        variant, blocks, out = args.worker
        Path(out).write_text(json.dumps(worker(variant, int(blocks), args.repeats)))
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    help_seconds = time_help()
    startup = time_startup()
    print(f"startup: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    records = []
    env = {**_environment(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    for variant in args.variants:
        for blocks in QUICK_SIZES if args.quick else args.sizes:
            begin = time.perf_counter()
            out = Path(tempfile.mkdtemp(prefix="bnfold-bench-")) / "record.json"
            command = [sys.executable, __file__, "--worker", variant, str(blocks), str(out)]
            command += ["--repeats", str(args.repeats)]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"worker {variant} N={blocks} failed:\n{done.stderr[-3000:]}")
            records.append(json.loads(out.read_text()))
            shutil.rmtree(out.parent)
            print(f"{variant} N={blocks}: {time.perf_counter() - begin:.0f} s", file=sys.stderr)
    batch = time_batch(args.batch) if args.batch else None
    report = {
        "machine": machine(),
        "load_average_before_after": [load_before, os.getloadavg()],
        "seconds": time.perf_counter() - started,
        "help_seconds": help_seconds,
        "startup": startup,
        "batch": batch,
        "results": records,
    }
    print(tables(records))
    print()
    print(
        f"CLI on {startup['model']}: {startup['wall']:.2f} s wall, {startup['cpu']:.2f} s CPU; "
        f"importing {startup['imports']:.2f} s of {startup['importtime_wall']:.2f} s "
        f"({startup['imports'] / startup['importtime_wall']:.0%}) under -X importtime"
    )
    if batch:
        print(
            f"{batch['models']} golden models: separate calls {batch['separate_wall']:.1f} s "
            f"({batch['separate_cpu']:.1f} s CPU), one call {batch['one_call_wall']:.1f} s "
            f"({batch['one_call_cpu']:.1f} s CPU)"
        )
    print()
    print("\n".join(targets(records, help_seconds, batch)))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json} ({report['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
