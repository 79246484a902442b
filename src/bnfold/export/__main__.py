"""``python -m bnfold.export MODEL``: write MODEL as QONNX with quantizer and accumulator metadata.

A thin layer over ``bnfold.export_onnx``: argument parsing, progress, the
per-layer table, files and exit codes (0 written, 1 export failed, 2 usage).
TensorFlow is imported only after the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bnfold.cli import add_loading_options, report_failure, warnings_as_lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bnfold.export",
        description="Export a QKeras model with folded batchnorm as QONNX (ONNX with Quant "
        "nodes) for hls4ml and FINN, with each layer's quantizers and accumulator type as "
        "node metadata. The output is verified bit for bit against QKeras.",
    )
    parser.add_argument("model", type=Path, help="a .h5 or .keras file, or a SavedModel directory")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="the ONNX file to write (default: MODEL with suffix .onnx)",
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
    add_loading_options(parser)
    parser.add_argument(
        "--debug", action="store_true", help="show TensorFlow's logs and full tracebacks"
    )
    return parser


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


@warnings_as_lines()
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from bnfold.cli import import_tensorflow_quietly

    import_tensorflow_quietly(debug=args.debug)
    from bnfold.export import export_onnx
    from bnfold.files import check_output_path

    sources = _source_quantizers(parser, args.input_quantizers)
    try:
        output = args.output or _default_output(args.model)
        for extra_output in (args.report, args.hls4ml_config):
            if extra_output is not None:
                check_output_path(extra_output, source=args.model)
        exported = export_onnx(
            args.model,
            output,
            source_quantizers=sources,
            opset=args.opset,
            verify=args.verify,
            batch_size=None if args.dynamic_batch else 1,
            # hls4ml 1.3.0 reads one scale per weight Quant node.
            per_channel_scales=args.per_channel_scales and not args.hls4ml_config,
            strict=args.strict_types,
            safe=not args.unsafe_load,
            max_memory=args.max_memory,
            channels_first=args.channels_first,
            on_stage=_progress(sys.stderr.isatty() or args.debug),
        )
        metadata = {entry.key: entry.value for entry in exported.metadata_props}
        layers = json.loads(metadata["bnfold.layers"])
        verification = json.loads(metadata.get("bnfold.verification", "null"))
        if args.report:
            _write_report(
                args.report,
                {
                    "model": str(args.model),
                    "output": str(output),
                    "layers": layers,
                    "verification": verification,
                },
            )
        if args.hls4ml_config:
            from bnfold.hls4ml import hls4ml_config

            _write_hls4ml_config(args.hls4ml_config, hls4ml_config(exported))
    except Exception as error:  # whatever it is, one line (the traceback with --debug)
        return report_failure(error, model=args.model, debug=args.debug)
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


if __name__ == "__main__":
    sys.exit(main())
