"""Time accumulator_types on a model of 200 MAC layers (not a test: numbers vary by machine).

Usage: python scripts/bench_accumulator.py [--layers N]
"""

from __future__ import annotations

import argparse
import time

import bnfold
from bnfold.keras import keras, qkeras


def chain_model(layers: int, kernel_quantizer: str) -> keras.Model:
    """Alternating folded conv and depthwise blocks with quantized activations."""
    inputs = keras.Input((8, 8, 8))
    x = inputs
    for index in range(layers):
        if index % 2:
            x = qkeras.QDepthwiseConv2DBatchnorm(
                3,
                padding="same",
                depthwise_quantizer=kernel_quantizer,
                bias_quantizer=None,
                name=f"dw{index}",
            )(x)
        else:
            x = qkeras.QConv2DBatchnorm(
                8,
                1,
                kernel_quantizer=kernel_quantizer,
                bias_quantizer=None,
                name=f"pw{index}",
            )(x)
        x = qkeras.QActivation("quantized_relu(4,1)", name=f"relu{index}")(x)
    return keras.Model(inputs, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=200)
    args = parser.parse_args()
    # alpha=None is what most models have: QKeras layers turn it into per-channel
    # power-of-two scales, found by QKeras's iterative search on every call.
    for kernel_quantizer in ("quantized_bits(4,0,1)", "quantized_bits(4,0,1,alpha=1)"):
        model = chain_model(args.layers, kernel_quantizer)
        for mode in ("widths", "weights"):
            start = time.perf_counter()
            types = bnfold.accumulator_types(model, ["quantized_bits(8,3,1)"], mode=mode)
            elapsed = time.perf_counter() - start
            print(
                f"{kernel_quantizer:32} mode={mode:7}: {len(types)} MAC layers in {elapsed:.3f} s"
            )


if __name__ == "__main__":
    main()
