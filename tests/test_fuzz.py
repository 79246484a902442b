"""Damaged and hostile model files: every export ends in an ONNX file or a clean one-line error.

Seeded mutations of one valid .h5, of its bytes (truncations, bit flips, zeroed
blocks) and of its model configuration (hostile values, classes and modules
where Keras expects others), go through ``export_onnx`` in a single worker
process, one at a time, so that TensorFlow starts once; the test process
watches it, so a mutation that hangs or kills the interpreter is caught and
named instead of stopping the suite. The worker's working directory holds a
module a mutated configuration names; no payload may ever run. A few mutations
then go through the command line.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import random
import subprocess
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

import builders
from bnfold.keras import keras, qkeras

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = 200
CONFIG_MUTATIONS = 80
# A module in the worker's working directory that creates MARKER when imported.
PAYLOAD_MODULE = "bnfold_fuzz_payload"
MARKER = "payload_ran"
# The worker's time limit for the HDF5 probe (bnfold.loading.PROBE_SECONDS, 20 s
# by default): short, so that files that make h5py spin cost little here.
PROBE_SECONDS = 4.0
# No single export of this small model may take longer (it takes about 1 s).
BOUND_SECONDS = 60.0
PREVIOUS = b"previous output"

WORKER = """
import json, sys, traceback, warnings
import bnfold.loading
from bnfold.errors import BnfoldError
from bnfold.export import export_onnx

bnfold.loading.PROBE_SECONDS = float(sys.argv[1])
warnings.simplefilter("ignore")
print("READY", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    try:
        export_onnx(job["model"], job["output"], source_quantizers=job["source"])
        result = {"outcome": "exported"}
    except BnfoldError as error:
        result = {"outcome": "error", "class": type(error).__name__, "message": str(error)}
    except BaseException:
        result = {"outcome": "unexpected", "message": traceback.format_exc()}
    print("RESULT " + json.dumps(result), flush=True)
"""


# Values a hostile configuration puts where Keras expects others.
HOSTILE_VALUES = [
    10**12,
    -1,
    0,
    2**63,
    1e308,
    None,
    "",
    [],
    {},
    [[[[[[[[[[[]]]]]]]]]]],
    "quantized_bits(4,0,1,alpha=abs(-1))",
    "quantized_bits(100000000,3,1)",
    "quantized_relu(8,999999999999)",
    "__import__('os')",
    "Lambda",
    {"class_name": "Lambda", "config": {"function": "x"}},
    {"module": PAYLOAD_MODULE, "class_name": "Payload", "config": {}},
    {"class_name": "function", "module": PAYLOAD_MODULE, "config": "payload"},
    {"class_name": "__lambda__", "config": {"code": "AAAA"}},
    {"class_name": "quantized_bits", "config": {"bits": 10**9, "integer": 0}},
]


def mutate_config(config: dict, seed: int) -> tuple[dict, str]:
    """One seeded mutation of a model configuration and its description."""
    rng = random.Random(seed)
    mutated = copy.deepcopy(config)
    places = []
    stack = [mutated]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            places += [value] if value else []
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    place = rng.choice(places)
    key = rng.choice(sorted(place))
    kind = ("replace", "replace", "class", "module", "delete")[seed % 5]
    if kind == "class" and "class_name" in place:
        place["class_name"] = rng.choice(["Lambda", "Payload", "TFOpLambda", "QDense", "Model"])
        return mutated, f"class_name of an object set to {place['class_name']!r}"
    if kind == "module":
        place["module"] = rng.choice([PAYLOAD_MODULE, "os", "keras.layers", "builtins"])
        return mutated, f"module of {key!r}'s object set to {place['module']!r}"
    if kind == "delete":
        del place[key]
        return mutated, f"key {key!r} deleted"
    value = rng.choice(HOSTILE_VALUES)
    place[key] = copy.deepcopy(value)
    return mutated, f"{key!r} set to {value!r}"


@dataclass(frozen=True)
class Outcome:
    seed: int
    mutation: str
    outcome: str  # exported, error, unexpected, hung, crashed
    error_class: str = ""
    message: str = ""


def mutate(data: bytes, seed: int) -> tuple[bytes, str]:
    """One seeded mutation of ``data`` and its description."""
    rng = random.Random(seed)
    damaged = bytearray(data)
    kind = ("truncate", "flip", "zero")[seed % 3]
    if kind == "truncate":
        size = rng.randrange(1, len(data))
        return bytes(damaged[:size]), f"truncated to {size} bytes"
    if kind == "flip":
        positions = [rng.randrange(len(data)) for _ in range(rng.randint(1, 8))]
        for position in positions:
            damaged[position] ^= 1 << rng.randrange(8)
        return bytes(damaged), f"bits flipped at {positions}"
    start, length = rng.randrange(len(data)), rng.choice((8, 64, 512, 4096))
    end = min(start + length, len(data))
    damaged[start:end] = bytes(end - start)
    return bytes(damaged), f"bytes {start}..{end} zeroed"


def _fuzz_model() -> keras.Model:
    """Small, so that each export is quick: a folded convolution, an activation, a QDense."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            qkeras.QConv2DBatchnorm(
                3,
                3,
                kernel_quantizer="quantized_bits(4,0,1,alpha=1)",
                bias_quantizer="quantized_bits(10,4,1)",
                name="conv",
            ),
            qkeras.QActivation("quantized_relu(4,1)", name="relu"),
            keras.layers.Flatten(name="flatten"),
            qkeras.QDense(
                4,
                kernel_quantizer="quantized_bits(4,0,1)",
                bias_quantizer="quantized_bits(8,3,1)",
                name="dense",
            ),
        ],
        name="fuzz",
    )
    dense = model.get_layer("dense")
    rng = np.random.default_rng(1)  # seeded weights: the same file, so the same outcomes
    dense.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in dense.weights])
    return builders.randomize_batchnorm(model)


class Worker:
    """A Python process running exports one by one, watched for hangs and crashes."""

    def __init__(self, log: Path, cwd: Path | None = None) -> None:
        environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), environment.get("PYTHONPATH")])
        )
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(PROBE_SECONDS)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=environment,
                cwd=cwd,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        if self._next_line(BOUND_SECONDS) != "READY":
            raise RuntimeError(f"the fuzz worker did not start: {log.read_text()[-2000:]}")

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _next_line(self, timeout: float) -> str | None:
        """The next protocol line; None at the end of output; raises queue.Empty on timeout."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None or line == "READY" or line.startswith("RESULT "):
                return line

    def run(self, job: dict) -> tuple[str, str, str]:
        """(outcome, error class, message) of one export."""
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        try:
            line = self._next_line(BOUND_SECONDS)
        except queue.Empty:
            self.stop()
            return "hung", "", f"no result within {BOUND_SECONDS} s"
        if line is None:
            code = self.process.wait()
            return "crashed", "", f"exit status {code}: {self.log.read_text()[-2000:]}"
        result = json.loads(line.removeprefix("RESULT "))
        return result["outcome"], result.get("class", ""), result.get("message", "")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.h5"
    _fuzz_model().save(path)
    return path


def _write_mutation(original: Path, model: Path, seed: int, configs: bool) -> str:
    """Write mutation ``seed`` of ``original`` (of its bytes, or of its configuration)."""
    if not configs:
        damaged, mutation = mutate(original.read_bytes(), seed)
        model.write_bytes(damaged)
        return mutation
    model.write_bytes(original.read_bytes())
    with h5py.File(model, "r+") as file:
        config, mutation = mutate_config(json.loads(file.attrs["model_config"]), seed)
        file.attrs["model_config"] = json.dumps(config)
    return mutation


def _run_mutations(original: Path, folder: Path, count: int, configs: bool) -> list[Outcome]:
    """Each mutation's outcome, its files checked: a valid ONNX, or the old output untouched."""
    (folder / f"{PAYLOAD_MODULE}.py").write_text(f"open({MARKER!r}, 'w').close()\n")
    worker = Worker(folder / "worker.log", cwd=folder)
    results = []
    try:
        for seed in range(count):
            model, output = folder / f"m{seed}.h5", folder / f"m{seed}.onnx"
            mutation = _write_mutation(original, model, seed, configs)
            output.write_bytes(PREVIOUS)
            job = {
                "model": str(model),
                "output": str(output),
                "source": builders.INPUT_QUANTIZER,
            }
            outcome, error_class, message = worker.run(job)
            if outcome in ("hung", "crashed"):
                worker = Worker(folder / f"worker{seed}.log", cwd=folder)
            elif outcome == "exported":
                onnx.checker.check_model(onnx.load(output), full_check=True)
            elif output.read_bytes() != PREVIOUS:
                outcome, message = "unexpected", f"the old output changed; {message}"
            results.append(Outcome(seed, mutation, outcome, error_class, message))
            model.unlink()
            output.unlink()
    finally:
        worker.stop()
    leftovers = [path.name for path in folder.iterdir() if not path.name.endswith((".log", ".py"))]
    assert leftovers == [], f"files left behind (a payload ran if {MARKER!r}): {leftovers}"
    return results


@pytest.fixture(scope="module")
def outcomes(original, tmp_path_factory) -> list[Outcome]:
    return _run_mutations(original, tmp_path_factory.mktemp("mutations"), MUTATIONS, False)


@pytest.fixture(scope="module")
def config_outcomes(original, tmp_path_factory) -> list[Outcome]:
    folder = tmp_path_factory.mktemp("config_mutations")
    return _run_mutations(original, folder, CONFIG_MUTATIONS, True)


def _unclean(outcomes: list[Outcome]) -> list[str]:
    """The outcomes that are neither an export nor one clean, one-line error."""
    return [
        f"seed {o.seed} ({o.mutation}): {o.outcome}: {o.message}"
        for o in outcomes
        if o.outcome not in ("exported", "error")
        or (o.outcome == "error" and (not o.message or "\n" in o.message))
        or (o.error_class == "ModelFileError" and f"m{o.seed}.h5" not in o.message)
    ]


def test_every_config_mutation_ends_in_onnx_or_one_clean_error(config_outcomes):
    bad = _unclean(config_outcomes)
    assert not bad, "\n".join(bad)
    kinds = Counter(o.error_class or o.outcome for o in config_outcomes)
    assert kinds["exported"] > 0 and kinds["UnsafeModelError"] > 0, kinds
    assert kinds["QuantizerError"] > 0, kinds


def test_every_mutation_ends_in_onnx_or_one_clean_error(outcomes, original):
    bad = _unclean(outcomes)
    assert not bad, "\n".join(bad)
    # The mutations reach past the loader: some exports succeed, some fail later.
    kinds = Counter(o.error_class or o.outcome for o in outcomes)
    assert kinds["exported"] > 0 and kinds["ModelFileError"] > 0, kinds


def _cli(model: Path, output: Path, cwd: Path) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), environment.get("PYTHONPATH")])
    )
    command = [sys.executable, "-m", "bnfold.export", str(model), "-o", str(output)]
    command += ["--input-quantizer", builders.INPUT_QUANTIZER]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=BOUND_SECONDS * 2,
    )


@pytest.mark.parametrize("configs", [False, True], ids=["bytes", "configs"])
def test_command_line_sample_exits_0_or_1_with_one_line(request, original, tmp_path, configs):
    """One mutation per kind of outcome (exported, each error class) through the CLI."""
    outcomes = request.getfixturevalue("config_outcomes" if configs else "outcomes")
    (tmp_path / f"{PAYLOAD_MODULE}.py").write_text(f"open({MARKER!r}, 'w').close()\n")
    sample = {}
    for outcome in outcomes:
        if "hang" not in outcome.message:
            sample.setdefault(outcome.error_class or outcome.outcome, outcome)
    for kind, outcome in sorted(sample.items()):
        model, output = tmp_path / f"m{outcome.seed}.h5", tmp_path / f"m{outcome.seed}.onnx"
        _write_mutation(original, model, outcome.seed, configs)
        output.write_bytes(PREVIOUS)
        done = _cli(model, output, tmp_path)
        assert not (tmp_path / MARKER).exists(), (kind, outcome.mutation)
        lines = [line for line in done.stderr.splitlines() if not line.startswith("warning: ")]
        if kind == "exported":
            assert done.returncode == 0, done.stderr
            onnx.checker.check_model(onnx.load(output), full_check=True)
        else:
            assert done.returncode == 1, (kind, done.stderr)
            assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
            assert output.read_bytes() == PREVIOUS
        assert "Traceback" not in done.stderr
