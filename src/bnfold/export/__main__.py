"""``python -m bnfold.export MODEL``: write MODEL as QONNX with quantizer and accumulator metadata.

A thin layer over ``bnfold.export_onnx``: argument parsing, progress, the
per-layer table, files and exit codes (0 written, 1 export failed, 2 usage).
TensorFlow is imported only after the arguments are parsed, so ``--help`` is instant.

Several models (``A.h5 B.h5 ...``, or a quoted pattern such as ``'models/*.h5'``)
are exported one by one through ``bnfold.export.batch``, paying the imports once:
one line per file, a count at the end, exit 1 if any failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path
from typing import Any

from bnfold.cli import EXIT_FAILED, add_loading_options, report_failure, warnings_as_lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bnfold.export",
        description="Export a QKeras model with folded batchnorm as QONNX (ONNX with Quant "
        "nodes) for hls4ml and FINN, with each layer's quantizers and accumulator type as "
        "node metadata. The output is verified bit for bit against QKeras.",
    )
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="a .h5 or .keras file, or a SavedModel directory; several, or a quoted pattern "
        "such as 'models/*.h5', export each in turn, one line per file",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="the ONNX file to write (default: MODEL with suffix .onnx); with several "
        "models, the directory to write them in, as MODEL's name with suffix .onnx",
    )
    parser.add_argument(
        "--jobs",
        type=_positive,
        default=1,
        metavar="N",
        help="with several models, export them in N worker processes, each with its own "
        "TensorFlow (default 1: one after the other in this process)",
    )
    parser.add_argument(
        "--input-quantizer",
        action="append",
        metavar="Q",
        dest="input_quantizers",
        help="the quantizer of a model input, e.g. 'quantized_bits(8,3,1)', or its hls4ml type, "
        "e.g. 'ap_fixed<8,4>' (I counts the sign bit, as in hls4ml); once per input, in "
        "order; 'float' for an unquantized input (default: quantized_bits(8,0,1) for each)",
    )
    parser.add_argument("--opset", type=int, default=13, help="ONNX opset (default 13, max 18)")
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the bit-exact comparison of QONNX and QKeras outputs",
    )
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="leave the batch dimension dynamic (default: static batch of 1)",
    )
    parser.add_argument(
        "--no-per-channel-scales",
        dest="per_channel_scales",
        action="store_false",
        help="give each kernel one scale and a wider bit width instead of per-channel "
        "power-of-two scales (hls4ml 1.3.0 cannot read per-channel scales)",
    )
    parser.add_argument(
        "--channels-first",
        action="store_true",
        help="give 4-D graph inputs and outputs the NCHW layout, as Brevitas exports them "
        "(default: Keras's NHWC); either way each carries its layout annotation",
    )
    parser.add_argument(
        "--strict-types",
        action="store_true",
        help="fail where a MAC layer has no fixed-point accumulator type (a float input "
        "or kernel) instead of exporting it in float with a warning",
    )
    parser.add_argument(
        "--report", type=Path, metavar="PATH", help="also write the per-layer table as JSON"
    )
    parser.add_argument(
        "--hls4ml-config",
        type=Path,
        metavar="PATH",
        help="also write an hls4ml configuration with bnfold's types, YAML for a .yml/.yaml "
        "PATH, JSON otherwise; implies --no-per-channel-scales (see bnfold.hls4ml)",
    )
    parser.add_argument(
        "--hls4ml-fractional-bits",
        type=int,
        choices=range(33),
        metavar="N",
        help="with --hls4ml-config: fractional bits of the types of values computed in float "
        "(their integer bits hold their range), 0 to 32; default "
        "bnfold.hls4ml.FLOAT_FRACTIONAL_BITS, 16",
    )
    add_loading_options(parser)
    parser.add_argument(
        "--debug", action="store_true", help="show TensorFlow's logs and full tracebacks"
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1. Received: {text!r}")
    return value


def _layer_table(layers: list[dict[str, Any]]) -> str:
    columns = (
        "layer",
        "class",
        "kernel_quantizer",
        "bias_quantizer",
        "activation",
        "accumulator_hls",
    )
    headers = ("layer", "class", "kernel", "bias", "activation", "accumulator")
    rows = [headers] + [tuple(_cell(row, c) for c in columns) for row in layers]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cell(row: dict[str, Any], column: str) -> str:
    """A table cell; an input's type in both forms, for hls4ml users who think in ap_fixed."""
    value = row.get(column)
    if not value:
        return "-"
    if column == "activation" and row["class"] == "InputLayer":
        from bnfold.fixedpoint import FixedPoint

        return f"{value} ({FixedPoint.from_quantizer(value).hls()})"
    return str(value)


def _progress(enabled: bool) -> Any:
    from bnfold.export import STAGES

    def show(stage: str) -> None:
        if enabled:
            print(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage}", file=sys.stderr, flush=True)

    return show


def _write_report(path: Path, report: dict[str, Any]) -> None:
    from bnfold.files import atomic_output

    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")


def _write_hls4ml_config(path: Path, config: dict[str, Any]) -> None:
    from bnfold.files import atomic_output

    if path.suffix.lower() in (".yml", ".yaml"):
        import yaml

        text = yaml.safe_dump(config, sort_keys=False)
    else:
        text = json.dumps(config, indent=2) + "\n"
    with atomic_output(path) as temporary:
        temporary.write_text(text)


def _default_output(model: Path) -> Path:
    """MODEL with the suffix .onnx; a SavedModel given as "." or ".." by its real name."""
    return (model.resolve() if model.name in ("", "..") else model).with_suffix(".onnx")


def _source_quantizers(parser: argparse.ArgumentParser, texts: list[str] | None) -> Any:
    """The --input-quantizer values as quantizers (None for 'float'); unreadable: usage error."""
    from bnfold.errors import QuantizerError
    from bnfold.quantizer_table import parse_quantizer

    if not texts:
        return None
    try:
        return [None if text.lower() == "float" else parse_quantizer(text) for text in texts]
    except QuantizerError as error:
        parser.error(f"argument --input-quantizer: {error}")


def _export_options(args: argparse.Namespace) -> dict[str, Any]:
    """``export_onnx``'s keyword arguments from the command line (all but the quantizers)."""
    return {
        "opset": args.opset,
        "verify": args.verify,
        "batch_size": None if args.dynamic_batch else 1,
        # hls4ml 1.3.0 reads one scale per weight Quant node.
        "per_channel_scales": args.per_channel_scales and not args.hls4ml_config,
        "strict": args.strict_types,
        "safe": not args.unsafe_load,
        "max_memory": args.max_memory,
        "channels_first": args.channels_first,
    }


def _model_paths(parser: argparse.ArgumentParser, texts: list[str]) -> tuple[list[Path], bool]:
    """The MODEL arguments with patterns expanded, and whether they name several models.

    A pattern that is also an existing path names that path; one that matches
    nothing is a usage error (a shell would have passed it on unexpanded too).
    """
    paths: list[Path] = []
    several = len(texts) > 1
    for text in texts:
        if glob.has_magic(text) and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                parser.error(f"argument MODEL: no file matches the pattern {text!r}")
            paths += [Path(match) for match in matches]
            several = True
        else:
            paths.append(Path(text))
    return paths, several


@warnings_as_lines()
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    models, several = _model_paths(parser, args.models)
    if several:
        return _export_several(parser, args, models)
    model = models[0]
    from bnfold.cli import import_tensorflow_quietly

    import_tensorflow_quietly(debug=args.debug)
    from bnfold.export import export_onnx
    from bnfold.files import check_output_path

    sources = _source_quantizers(parser, args.input_quantizers)
    try:
        output = args.output or _default_output(model)
        for extra_output in (args.report, args.hls4ml_config):
            if extra_output is not None:
                check_output_path(extra_output, source=model)
        exported = export_onnx(
            model,
            output,
            source_quantizers=sources,
            **_export_options(args),
            on_stage=_progress(sys.stderr.isatty() or args.debug),
        )
        metadata = {entry.key: entry.value for entry in exported.metadata_props}
        layers = json.loads(metadata["bnfold.layers"])
        verification = json.loads(metadata.get("bnfold.verification", "null"))
        if args.report:
            _write_report(
                args.report,
                {
                    "model": str(model),
                    "output": str(output),
                    "layers": layers,
                    "verification": verification,
                },
            )
        if args.hls4ml_config:
            from bnfold.hls4ml import hls4ml_config

            bits = args.hls4ml_fractional_bits
            options = {} if bits is None else {"fractional_bits": bits}
            _write_hls4ml_config(args.hls4ml_config, hls4ml_config(exported, **options))
    except Exception as error:  # whatever it is, one line (the traceback with --debug)
        return report_failure(error, model=model, debug=args.debug)
    print(_layer_table(layers))
    if verification and verification.get("tolerance"):
        print(
            f"verified: QONNX equals QKeras exactly where it computes in fixed point and "
            f"within {verification['tolerance']:g} on float outputs, on "
            f"{verification['samples']} samples (max difference "
            f"{verification['max_difference']})"
        )
    elif verification:
        print(
            f"verified: QONNX equals QKeras on {verification['samples']} samples "
            f"(max difference {verification['max_difference']})"
        )
    else:
        print("not verified (--no-verify)")
    print(f"wrote {output}")
    if args.hls4ml_config:
        print(f"wrote {args.hls4ml_config}")
    return 0


def _batch_outputs(
    parser: argparse.ArgumentParser, models: list[Path], directory: Path | None
) -> list[Path]:
    """Each model's ONNX file: beside it, or in ``directory``; two models may not share one."""
    if directory is not None and directory.exists() and not directory.is_dir():
        parser.error(
            f"argument -o/--output: with several models it names a directory. Received: "
            f"{str(directory)!r}, an existing file"
        )
    outputs = [_default_output(model) for model in models]
    if directory is not None:
        outputs = [directory / output.name for output in outputs]
    seen: dict[Path, Path] = {}
    for model, output in zip(models, outputs, strict=True):
        if output.resolve() in seen:
            parser.error(
                f"each model needs its own output file. Received: {str(seen[output.resolve()])!r} "
                f"and {str(model)!r}, both written to {str(output)!r}"
            )
        seen[output.resolve()] = model
    return outputs


def _export_several(
    parser: argparse.ArgumentParser, args: argparse.Namespace, models: list[Path]
) -> int:
    """Export each model, one summary line per file, then the count; 1 if any failed."""
    import time

    from tqdm import tqdm  # a dependency of QKeras: no extra install

    from bnfold.export.batch import Job, export_each

    for option, value in (("--report", args.report), ("--hls4ml-config", args.hls4ml_config)):
        if value is not None:
            parser.error(f"argument {option}: names one file, so it takes one MODEL")
    outputs = _batch_outputs(parser, models, args.output)
    if args.output is not None:
        args.output.mkdir(parents=True, exist_ok=True)
    quantizers = tuple(args.input_quantizers) if args.input_quantizers else None
    if args.jobs == 1:
        from bnfold.cli import import_tensorflow_quietly

        import_tensorflow_quietly(debug=args.debug)
        _source_quantizers(parser, args.input_quantizers)  # a usage error before any work
    jobs = [
        Job(model, output, _export_options(args), quantizers)
        for model, output in zip(models, outputs, strict=True)
    ]
    start = time.perf_counter()
    failed = 0
    with tqdm(
        total=len(jobs), unit="model", file=sys.stderr, disable=not sys.stderr.isatty()
    ) as bar:
        for outcome in export_each(jobs, workers=args.jobs, debug=args.debug):
            for warning in outcome.warnings:
                print(f"warning: {outcome.job.model}: {warning}", file=sys.stderr, flush=True)
            if outcome.traceback:
                print(outcome.traceback, file=sys.stderr, end="", flush=True)
            if outcome.error:
                failed += 1
                # Each line leads with its file, even when the error names it too.
                line = f"failed  {outcome.job.model}: {outcome.error}"
            else:
                line = (
                    f"ok      {outcome.job.model} -> {outcome.job.output}: "
                    f"{outcome.summary}, {outcome.seconds:.1f} s"
                )
            bar.write(line, file=sys.stdout)
            bar.update()
    seconds = time.perf_counter() - start
    print(
        f"exported {len(jobs) - failed} of {len(jobs)} models"
        + (f", {failed} failed" if failed else "")
        + f" ({seconds:.1f} s)"
    )
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
