"""Export many model files in one command: in this process, or in worker processes.

Each file is exported on its own: a failure is recorded with its one-line
message and the next file goes on (``export_onnx`` never leaves a partial
output). Worker processes are started fresh ("spawn"), each importing its own
TensorFlow once; TensorFlow is not safe to fork once it runs threads. What a
worker sends back is plain text, never a model or an exception object.
Nothing here imports TensorFlow until a file is exported.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnfold.cli import failure_message, import_tensorflow_quietly, one_line
from bnfold.errors import BnfoldWarning


@dataclass(frozen=True)
class Job:
    """One file to export: where from, where to, and ``export_onnx``'s keyword arguments.

    ``input_quantizers`` are the ``--input-quantizer`` texts (None: the defaults),
    parsed where the export runs, since quantizer objects do not cross processes.
    """

    model: Path
    output: Path
    options: dict[str, Any]
    input_quantizers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one ``Job``: ``summary`` on success, else ``error`` (one line)."""

    job: Job
    seconds: float
    summary: str = ""
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    traceback: str = ""


def _summary(exported: Any) -> str:
    """The layer count and the verification of an exported model, from its metadata."""
    metadata = {entry.key: entry.value for entry in exported.metadata_props}
    layers = len(json.loads(metadata["bnfold.layers"]))
    verification = json.loads(metadata.get("bnfold.verification", "null"))
    if verification is None:
        return f"{layers} layers, not verified"
    tolerance = verification.get("tolerance")
    within = f", float outputs within {tolerance:g}" if tolerance else ""
    return (
        f"{layers} layers, verified on {verification['samples']} samples "
        f"(max difference {verification['max_difference']}{within})"
    )


def export_one(job: Job, debug: bool = False) -> Outcome:
    """Export ``job``; whatever happens, return an ``Outcome`` (never raise)."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BnfoldWarning)
        try:
            from bnfold.export import export_onnx
            from bnfold.quantizer_table import parse_quantizer

            sources = None
            if job.input_quantizers:
                sources = [
                    None if text.lower() == "float" else parse_quantizer(text)
                    for text in job.input_quantizers
                ]
            exported = export_onnx(job.model, job.output, source_quantizers=sources, **job.options)
            summary, error, trace = _summary(exported), "", ""
        except Exception as raised:  # each file's failure is its own line; the others go on
            summary, error = "", failure_message(raised, debug=debug)
            trace = "".join(traceback.format_exception(raised)) if debug else ""
    return Outcome(
        job,
        time.perf_counter() - start,
        summary=summary,
        error=error,
        warnings=[
            one_line(str(w.message)) for w in caught if issubclass(w.category, BnfoldWarning)
        ],
        traceback=trace,
    )


def _start_worker(debug: bool) -> None:
    import_tensorflow_quietly(debug=debug)


def export_each(jobs: Sequence[Job], *, workers: int = 1, debug: bool = False) -> Iterator[Outcome]:
    """Export every job, yielding each ``Outcome`` as it completes.

    Args:
        jobs: the files to export.
        workers: 1 exports here, one file after the other, in order; more starts
            that many worker processes (never more than there are jobs), and
            outcomes come in the order they finish.
        debug: keep TensorFlow's logs and record each failure's traceback.
    """
    if workers <= 1 or len(jobs) <= 1:
        import_tensorflow_quietly(debug=debug)
        for job in jobs:
            yield export_one(job, debug)
        return
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(debug,),
    ) as pool:
        pending: dict[Future[Outcome], Job] = {
            pool.submit(export_one, job, debug): job for job in jobs
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    yield future.result()
                except Exception as raised:  # the worker process died (out of memory, say)
                    yield Outcome(job, 0.0, error=failure_message(raised, debug=debug))
