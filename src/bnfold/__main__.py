"""``python -m bnfold unfold MODEL [-o OUT]``: save the unfolded model and list what changed.

TensorFlow is imported only after the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bnfold.cli import (
    add_loading_options,
    import_tensorflow_quietly,
    report_failure,
    warnings_as_lines,
)


def _describe(model, unfolded) -> list[str]:
    """One line per layer that unfolding replaced."""
    from bnfold.folding import folded_layer_type
    from bnfold.keras import keras

    lines = []
    for layer in model.layers:
        new = unfolded.get_layer(layer.name)
        if isinstance(layer, keras.Model):
            lines += [f"{layer.name}/{line}" for line in _describe(layer, new)]
        elif folded_layer_type(layer) is not None:
            quantizers = ", ".join(str(q) for q in new.quantizers)
            lines.append(
                f"{layer.name}: {type(layer).__name__} -> {type(new).__name__} [{quantizers}]"
            )
    return lines


def _unfold(args: argparse.Namespace) -> int:
    import_tensorflow_quietly()
    from bnfold.files import check_output_path, save_keras_model
    from bnfold.loading import load_model
    from bnfold.unfold import unfold_model

    model_path = Path(args.model)
    output = Path(args.output or model_path.with_name(f"{model_path.stem}_unfolded.h5"))
    try:
        with warnings_as_lines():
            check_output_path(output, source=model_path)
            model = load_model(model_path, safe=not args.unsafe_load, max_memory=args.max_memory)
            unfolded = unfold_model(model)
            save_keras_model(unfolded, output)
    except Exception as error:  # every failure ends as one line (see report_failure)
        return report_failure(error, model=model_path)
    for line in _describe(model, unfolded) or ["no folded layer found"]:
        print(line)
    print(f"wrote {output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnfold", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    unfold = commands.add_parser(
        "unfold", help="replace folded batchnorm layers by plain QKeras layers and save the model"
    )
    unfold.add_argument("model", help="a .h5 or .keras file, or a SavedModel directory")
    unfold.add_argument(
        "-o",
        "--output",
        help="where to save the unfolded model (default: MODEL_unfolded.h5 beside MODEL)",
    )
    add_loading_options(unfold)
    unfold.set_defaults(run=_unfold)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
