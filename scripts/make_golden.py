"""Build the reference models under golden/ and their expected outputs, deterministically.

Usage: python scripts/make_golden.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import bnfold
from bnfold.folding import folded_layer_type
from bnfold.keras import keras, qkeras

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SEED = 20261125


def _randomize_folded_layers(model: keras.Model, rng: np.random.Generator) -> None:
    """Seeded kernels and batchnorm statistics, so that folding is not trivial."""
    for layer in model.layers:
        entry = folded_layer_type(layer)
        if entry is None:
            continue
        kernel = getattr(layer, entry.kernel)
        kernel.assign(rng.normal(0, 0.4, kernel.shape).astype(np.float32))
        if layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape).astype(np.float32))
        channels = layer.batchnorm.moving_mean.shape
        layer.batchnorm.set_weights(
            [
                rng.uniform(0.5, 1.5, channels).astype(np.float32),
                rng.normal(0, 0.3, channels).astype(np.float32),
                rng.normal(0, 0.3, channels).astype(np.float32),
                rng.uniform(0.2, 2.0, channels).astype(np.float32),
            ]
        )


def jet_tagging_mlp() -> tuple[keras.Model, str]:
    """The hls4ml jet-tagging benchmark shape: 16 features, 64-32-32 hidden, 5 classes."""
    inputs = keras.Input((16,), name="features")
    x = inputs
    for index, units in enumerate((64, 32, 32), start=1):
        x = bnfold.layers.QDenseBatchnorm(
            units,
            kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
            bias_quantizer=None,
            name=f"fc{index}",
        )(x)
        x = qkeras.QActivation("quantized_relu(6,2)", name=f"relu{index}")(x)
    x = bnfold.layers.QDenseBatchnorm(
        5,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer=None,
        name="output",
    )(x)
    return keras.Model(inputs, x, name="jet_tagging_mlp"), "quantized_bits(8,3,1,alpha=1)"


MODELS = {"jet_tagging_mlp": jet_tagging_mlp}


def _grid_inputs(model: keras.Model, rng: np.random.Generator) -> list[np.ndarray]:
    """Inputs on the grid of quantized_bits(8,3,1): steps of 1/16 in [-8, 8)."""
    return [
        (rng.integers(-128, 128, (32, *t.shape[1:])) / 16).astype(np.float32) for t in model.inputs
    ]


def main() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, build in MODELS.items():
        rng = np.random.default_rng(SEED)
        model, source_quantizer = build()
        _randomize_folded_layers(model, rng)
        model.save(GOLDEN / f"{name}.h5")
        inputs = _grid_inputs(model, rng)
        outputs = model.predict(inputs, verbose=0)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        np.savez(
            GOLDEN / f"{name}.npz",
            **{f"input_{i}": x for i, x in enumerate(inputs)},
            **{f"output_{i}": y for i, y in enumerate(outputs)},
        )
        (GOLDEN / f"{name}.json").write_text(
            json.dumps({"source_quantizers": [source_quantizer] * len(inputs)}, indent=2) + "\n"
        )
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
