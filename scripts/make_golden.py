"""Build the reference models under golden/ and their expected files, deterministically.

Usage:
    python scripts/make_golden.py [NAME ...]           rebuild; write what changed
    python scripts/make_golden.py --check [NAME ...]   compare only; exit 1 on differences

Each difference is printed as model, layer, field, old (stored) value, new
(rebuilt) value.

Each model is built from code with seeded weights and batchnorm statistics,
saved to a temporary .h5 file, read back with ``bnfold.load_model`` and
recorded from that file (see ``golden_records``), exactly as the tests record
it. A file is rewritten only when its contents change, so rebuilding without a
change leaves the repository untouched. Regenerating the expected files is
legitimate only for a deliberate change, explained in the commit.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bnfold
import golden_records
import supported_versions
from bnfold.fixedpoint import FixedPoint
from bnfold.graph import iter_layers
from bnfold.keras import keras, qkeras
from golden_records import GOLDEN, MODEL_LEVEL, MODEL_NAMES, Difference

SEED = 20261125
# The one stack whose numbers golden/ records (constraints/reference.txt).
REFERENCE_ROW = "py3.11-reference"
QDenseBatchnorm = bnfold.layers.QDenseBatchnorm


@dataclass(frozen=True)
class GoldenModel:
    """How to build one reference model and what to record about it."""

    build: Callable[[], keras.Model]
    source_quantizers: tuple[str, ...]
    samples: int  # sample inputs stored; QONNX execution in the tests runs them one by one


# ------------------------------------------------------------------------ models


def _conv(filters: int, kernel: int, name: str, **settings: object) -> qkeras.QConv2DBatchnorm:
    settings = {
        "padding": "same",
        "kernel_quantizer": "quantized_bits(6,0,1,alpha=1)",
        "bias_quantizer": "quantized_bits(10,3,1,alpha=1)",
        **settings,
    }
    return qkeras.QConv2DBatchnorm(filters, kernel, name=name, **settings)


def _depthwise(name: str, **settings: object) -> qkeras.QDepthwiseConv2DBatchnorm:
    settings = {
        "padding": "same",
        "depthwise_quantizer": "quantized_bits(6,0,1,alpha=1)",
        "bias_quantizer": "quantized_bits(10,3,1,alpha=1)",
        **settings,
    }
    return qkeras.QDepthwiseConv2DBatchnorm(3, name=name, **settings)


def _relu(name: str, quantizer: str = "quantized_relu(8,3)") -> qkeras.QActivation:
    return qkeras.QActivation(quantizer, name=name)


def resnet_tiny() -> keras.Model:
    """Two residual blocks as in MLPerf Tiny's ResNet; the second strides, with a 1x1 projection."""
    image = keras.Input((16, 16, 3), name="image")
    stem = _relu("stem_relu")(_conv(8, 3, "stem")(image))
    x = _relu("b1_relu1")(_conv(8, 3, "b1_conv1")(stem))
    x = _conv(8, 3, "b1_conv2")(x)
    block1 = _relu("b1_relu2")(keras.layers.Add(name="b1_add")([stem, x]))
    x = _relu("b2_relu1")(_conv(8, 3, "b2_conv1", strides=2)(block1))
    x = _conv(8, 3, "b2_conv2")(x)
    shortcut = _conv(8, 1, "b2_projection", strides=2, padding="valid")(block1)
    x = _relu("b2_relu2")(keras.layers.Add(name="b2_add")([shortcut, x]))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)  # 8x8: a power of two
    logits = qkeras.QDense(
        10,
        kernel_quantizer="quantized_bits(8,0,1,alpha=1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        name="logits",
    )(x)
    return keras.Model(image, logits, name="resnet_tiny")


def kws_dscnn() -> keras.Model:
    """A keyword-spotting DS-CNN: a strided conv, then depthwise + 1x1 pointwise blocks."""
    mfcc = keras.Input((16, 8, 1), name="mfcc")
    x = _conv(8, 3, "stem", strides=(2, 1), activation="quantized_relu(6,3)")(mfcc)
    for block in (1, 2):
        x = _relu(f"ds{block}_dw_relu", "quantized_relu(6,3)")(_depthwise(f"ds{block}_dw")(x))
        x = _relu(f"ds{block}_pw_relu", "quantized_relu(6,3)")(_conv(8, 1, f"ds{block}_pw")(x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)  # 8x8: a power of two
    keywords = qkeras.QDense(
        6,
        kernel_quantizer="quantized_bits(8,0,1,alpha=1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        name="keywords",
    )(x)
    return keras.Model(mfcc, keywords, name="kws_dscnn")


def dense_autoencoder() -> keras.Model:
    """An anomaly-detection autoencoder 32-16-8-4-8-16-32 of QDenseBatchnorm layers."""
    signal = keras.Input((32,), name="signal")
    x = signal
    widths = {"enc1": 16, "enc2": 8, "code": 4, "dec1": 8, "dec2": 16}
    for name, units in widths.items():
        x = QDenseBatchnorm(
            units,
            kernel_quantizer="quantized_bits(8,1,1,alpha=1)",
            bias_quantizer="quantized_bits(12,4,1,alpha=1)",
            activation="quantized_relu(8,3)",
            name=name,
        )(x)
    reconstruction = QDenseBatchnorm(
        32,
        kernel_quantizer="quantized_bits(8,1,1,alpha=1)",
        bias_quantizer="quantized_bits(12,4,1,alpha=1)",
        name="reconstruction",
    )(x)
    return keras.Model(signal, reconstruction, name="dense_autoencoder")


def jet_tagging_mlp() -> keras.Model:
    """The hls4ml jet-tagging benchmark shape, 16-64-32-32-5; no bias quantizer anywhere."""
    features = keras.Input((16,), name="features")
    x = features
    for index, units in enumerate((64, 32, 32), start=1):
        x = QDenseBatchnorm(
            units,
            kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
            bias_quantizer=None,
            name=f"fc{index}",
        )(x)
        x = _relu(f"relu{index}", "quantized_relu(6,2)")(x)
    x = QDenseBatchnorm(
        5,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer=None,
        name="output",
    )(x)
    return keras.Model(features, x, name="jet_tagging_mlp")


def two_in_two_out() -> keras.Model:
    """An image branch and a non-negative side input, merged; a class head and a regression head."""
    image = keras.Input((8, 8, 2), name="image")
    aux = keras.Input((6,), name="aux")
    x = _conv(4, 3, "conv", bias_quantizer=None, activation="quantized_relu(6,2)")(image)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    side = QDenseBatchnorm(
        8,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        activation="quantized_relu(6,2)",
        name="aux_dense",
    )(aux)
    x = keras.layers.Concatenate(name="merge")([x, side])
    x = QDenseBatchnorm(
        16,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer=None,
        activation="quantized_relu(6,2)",
        name="shared",
    )(x)
    heads = [
        QDenseBatchnorm(
            units,
            kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
            bias_quantizer=bias_quantizer,
            name=name,
        )(x)
        for name, units, bias_quantizer in (
            ("class_scores", 4, "quantized_bits(12,4,1,alpha=1)"),
            ("regression", 2, None),
        )
    ]
    return keras.Model([image, aux], heads, name="two_in_two_out")


def nested_blocks() -> keras.Model:
    """A functional residual block and a Sequential separable block, each a nested model."""
    block_in = keras.Input((8, 8, 8), name="res_in")
    x = _conv(8, 3, "conv_a", activation="quantized_relu(6,2)")(block_in)
    x = _conv(8, 3, "conv_b")(x)
    x = keras.layers.Add(name="add")([block_in, x])
    res_block = keras.Model(block_in, _relu("relu", "quantized_relu(6,2)")(x), name="res_block")
    ds_block = keras.Sequential(
        [
            keras.Input((8, 8, 8), name="ds_in"),
            _depthwise("dw", bias_quantizer=None),
            _relu("dw_relu", "quantized_relu(6,2)"),
            _conv(4, 1, "pw"),
            _relu("pw_relu", "quantized_relu(6,2)"),
        ],
        name="ds_block",
    )
    inputs = keras.Input((8, 8, 4), name="x")
    x = _relu("stem_relu", "quantized_relu(6,2)")(_conv(8, 3, "stem")(inputs))
    x = ds_block(res_block(x))
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = QDenseBatchnorm(
        5,
        kernel_quantizer="quantized_bits(6,0,1,alpha=1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        name="classifier",
    )(x)
    return keras.Model(inputs, x, name="nested_blocks")


def po2_no_bias() -> keras.Model:
    """Per-channel power-of-two kernel scales (``alpha="auto_po2"`` or None) and use_bias=False.

    Without a bias the folded layers still get one, the batchnorm shift; some
    bias quantizers are left empty for populate to fill.
    """
    image = keras.Input((8, 8, 3), name="image")
    po2 = "quantized_bits(4,0,1,alpha='auto_po2')"
    x = _conv(8, 3, "conv", kernel_quantizer=po2, bias_quantizer=None, use_bias=False)(image)
    x = _relu("conv_relu", "quantized_relu(6,2)")(x)
    # alpha=None: the layer makes it "auto_po2" itself, as QKeras users meet it.
    x = _depthwise("dw", depthwise_quantizer="quantized_bits(4,0,1)", use_bias=False)(x)
    x = _relu("dw_relu", "quantized_relu(6,2)")(x)
    x = _conv(8, 1, "pw", kernel_quantizer=po2, bias_quantizer=None, use_bias=False)(x)
    x = _relu("pw_relu", "quantized_relu(6,2)")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = QDenseBatchnorm(
        4,
        kernel_quantizer="quantized_bits(6,0,1,alpha='auto_po2')",
        bias_quantizer="quantized_bits(12,4,1,alpha=1)",
        use_bias=False,
        name="dense",
    )(x)
    return keras.Model(image, x, name="po2_no_bias")


def binary_ternary_po2() -> keras.Model:
    """Few-bit weights as FPGA users train them: a ternary folded conv (``ternary()``, which
    the layer gives a per-channel power-of-two scale), a binary conv, and power-of-two
    dense kernels, folded and plain."""
    image = keras.Input((8, 8, 2), name="image")
    x = _conv(8, 3, "conv_ternary", kernel_quantizer="ternary()")(image)
    x = _relu("relu1", "quantized_relu(4,2)")(x)
    x = qkeras.QConv2D(
        8,
        3,
        padding="same",
        kernel_quantizer="binary(alpha=1)",
        bias_quantizer="quantized_bits(8,3,1,alpha=1)",
        name="conv_binary",
    )(x)
    x = _relu("relu2", "quantized_relu(4,2)")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = QDenseBatchnorm(
        16,
        kernel_quantizer="quantized_po2(4,1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        name="dense_po2",
    )(x)
    x = _relu("relu3", "quantized_relu(6,2)")(x)
    x = qkeras.QDense(
        4,
        kernel_quantizer="quantized_po2(5,1)",
        bias_quantizer="quantized_bits(8,3,1,alpha=1)",
        name="output",
    )(x)
    return keras.Model(image, x, name="binary_ternary_po2")


_SIX_BITS = "quantized_bits(6,0,1,alpha=1)"


def _plain_quantized(cls: type, *args: object, name: str) -> keras.layers.Layer:
    """A QConv2D or QDense, trained without folding: 6-bit kernel and bias."""
    return cls(*args, kernel_quantizer=_SIX_BITS, bias_quantizer=_SIX_BITS, name=name)


def tutorial_cnn() -> keras.Model:
    """The hls4ml tutorial CNN: QConv2D + BatchNormalization + QActivation blocks, max
    pooling, a QDense block, a float Dense output layer and a softmax."""
    image = keras.Input((12, 12, 3), name="image")
    x = image
    for index, filters in enumerate((8, 8), start=1):
        x = _plain_quantized(qkeras.QConv2D, filters, 3, name=f"conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_conv{index}")(x)
        x = _relu(f"relu{index}", "quantized_relu(6)")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = _plain_quantized(qkeras.QDense, 12, name="dense1")(x)
    x = keras.layers.BatchNormalization(name="bn_dense1")(x)
    x = _relu("relu3", "quantized_relu(6)")(x)
    x = keras.layers.Dense(5, name="output")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(image, x, name="tutorial_cnn")


def softmax_batchnorm_mlp() -> keras.Model:
    """The jet-tagging MLP trained without folding: QDense + BatchNormalization +
    QActivation layers, a QDense output and a softmax."""
    features = keras.Input((16,), name="features")
    x = features
    for index, units in enumerate((32, 16), start=1):
        x = _plain_quantized(qkeras.QDense, units, name=f"fc{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = _relu(f"relu{index}", "quantized_relu(6,2)")(x)
    x = _plain_quantized(qkeras.QDense, 5, name="output")(x)
    x = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(features, x, name="softmax_batchnorm_mlp")


def separable_gap() -> keras.Model:
    """A depthwise-separable CNN: a folded stem, QSeparableConv2D blocks (one with a depth
    multiplier of 2), a QGlobalAveragePooling2D with an average_quantizer, a QDense head."""
    image = keras.Input((8, 8, 3), name="image")
    x = _conv(8, 3, "stem", activation="quantized_relu(6,3)")(image)
    for block, multiplier in ((1, 1), (2, 2)):
        x = qkeras.QSeparableConv2D(
            8,
            3,
            padding="same",
            depth_multiplier=multiplier,
            depthwise_quantizer="quantized_bits(6,0,1)",  # auto_po2 inside the layer
            pointwise_quantizer="quantized_bits(6,0,1,alpha=1)",
            bias_quantizer="quantized_bits(10,3,1,alpha=1)",
            activation="quantized_relu(6,3)",
            name=f"sep{block}",
        )(x)
    x = qkeras.QGlobalAveragePooling2D(  # 8x8: a power of two
        average_quantizer="quantized_bits(8,0,1)", name="pool"
    )(x)
    x = qkeras.QActivation("quantized_bits(8,3,1)", name="pool_q")(x)
    logits = qkeras.QDense(
        4,
        kernel_quantizer="quantized_bits(8,0,1,alpha=1)",
        bias_quantizer="quantized_bits(10,3,1,alpha=1)",
        name="logits",
    )(x)
    return keras.Model(image, logits, name="separable_gap")


MODELS: dict[str, GoldenModel] = {
    "resnet_tiny": GoldenModel(resnet_tiny, ("quantized_bits(8,3,1,alpha=1)",), 8),
    "kws_dscnn": GoldenModel(kws_dscnn, ("quantized_bits(8,4,1,alpha=1)",), 8),
    "dense_autoencoder": GoldenModel(dense_autoencoder, ("quantized_bits(10,4,1,alpha=1)",), 16),
    "jet_tagging_mlp": GoldenModel(jet_tagging_mlp, ("quantized_bits(8,3,1,alpha=1)",), 16),
    "two_in_two_out": GoldenModel(
        two_in_two_out, ("quantized_bits(8,3,1,alpha=1)", "quantized_relu(8,3)"), 8
    ),
    "nested_blocks": GoldenModel(nested_blocks, ("quantized_bits(6,2,1,alpha=1)",), 8),
    "po2_no_bias": GoldenModel(po2_no_bias, ("quantized_bits(8,3,1,alpha=1)",), 8),
    "tutorial_cnn": GoldenModel(tutorial_cnn, ("quantized_bits(8,0,1,alpha=1)",), 8),
    "softmax_batchnorm_mlp": GoldenModel(
        softmax_batchnorm_mlp, ("quantized_bits(8,3,1,alpha=1)",), 16
    ),
    "binary_ternary_po2": GoldenModel(binary_ternary_po2, ("quantized_bits(8,3,1,alpha=1)",), 8),
    "separable_gap": GoldenModel(separable_gap, ("quantized_bits(8,3,1,alpha=1)",), 8),
}


# ------------------------------------------------------------------------ weights and inputs


def _rng(name: str, stream: int) -> np.random.Generator:
    """A generator that depends only on the model's name, not on build order."""
    return np.random.default_rng([SEED, zlib.crc32(name.encode()), stream])


def _initial_values(weight: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Seeded values by weight name: kernels scaled by fan-in, statistics that make folding move."""
    if weight in ("kernel", "depthwise_kernel", "pointwise_kernel"):
        summed = shape[:2] if weight == "depthwise_kernel" else shape[:-1]
        values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(summed)), shape)
    elif weight == "gamma":  # some negative: folding then flips a channel's sign
        values = rng.uniform(0.6, 1.4, shape) * rng.choice([-1.0, 1.0], shape, p=[0.15, 0.85])
    elif weight == "moving_variance":
        values = rng.uniform(0.25, 2.0, shape)
    elif weight in ("bias", "beta", "moving_mean"):
        values = rng.normal(0.0, 0.4, shape)
    else:
        raise ValueError(f"make_golden has no initial values for weight {weight!r}")
    return values.astype(np.float32)


def _set_weights(model: keras.Model, rng: np.random.Generator) -> None:
    """Overwrite every float weight, so that no Keras initializer's randomness remains."""
    for _, layer in iter_layers(model):
        if isinstance(layer, keras.Model):
            continue
        for variable in layer.weights:
            if not variable.dtype.is_floating:
                continue
            weight = variable.name.split("/")[-1].split(":")[0]
            variable.assign(_initial_values(weight, tuple(variable.shape), rng))


def sample_inputs(
    model: keras.Model, source_quantizers: tuple[str, ...], samples: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Inputs on each source quantizer's grid: its minimum, its maximum, then typical values."""
    inputs = {}
    for tensor, quantizer in zip(model.inputs, source_quantizers, strict=True):
        grid = FixedPoint.from_quantizer(quantizer)
        low, high = round(grid.min / grid.step), round(grid.max / grid.step)
        shape = (samples, *tensor.shape[1:])
        codes = np.clip(np.round(rng.normal(0.0, high / 3, shape)), low, high)
        codes[0], codes[1] = low, high
        inputs[tensor.name.split(":")[0]] = (codes * grid.step).astype(np.float32)
    return inputs


# ------------------------------------------------------------------------ rebuilding


def build(name: str, path: Path) -> None:
    """Build model ``name`` with its seeded weights and save it to ``path``."""
    keras.backend.clear_session()  # layer name counters start again: same weight names
    model = MODELS[name].build()
    _set_weights(model, _rng(name, 0))
    model.save(path)


def rebuild(name: str, directory: Path = GOLDEN, *, write: bool = False) -> list[Difference]:
    """Rebuild model ``name`` and compare it with its files in ``directory``.

    Args:
        name: one of ``MODEL_NAMES``.
        directory: where the stored files are.
        write: write the files whose contents differ (the .h5 when its config or
            weights differ, not merely its bytes).

    Returns:
        The differences from the stored files (before writing): ``old`` is the
        stored value, ``new`` the rebuilt one.
    """
    spec = MODELS[name]
    stored = golden_records.paths(name, directory)
    with tempfile.TemporaryDirectory() as temporary:
        # Same file name, so that the export's bnfold.source metadata matches.
        path = Path(temporary) / f"{name}.h5"
        build(name, path)
        loaded = golden_records.load(path, list(spec.source_quantizers))
        inputs = sample_inputs(loaded.folded, spec.source_quantizers, spec.samples, _rng(name, 1))
        fresh = golden_records.recording(loaded, inputs)
        missing = [kind for kind, file in stored.items() if not file.is_file()]
        h5_differences = (
            [] if "h5" in missing else golden_records.compare_h5(name, stored["h5"], path)
        )
        if missing:
            differences = [
                Difference(name, MODEL_LEVEL, f"{kind} file", golden_records.MISSING, "rebuilt")
                for kind in missing
            ]
        else:
            stored_recording = golden_records.read(name, directory)
            differences = h5_differences + golden_records.compare(name, stored_recording, fresh)
        if write:
            directory.mkdir(parents=True, exist_ok=True)
            if "h5" in missing or h5_differences:
                shutil.copyfile(path, stored["h5"])
            golden_records.write(name, fresh, directory)
    return differences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with golden/ without writing")
    parser.add_argument(
        "--directory",
        type=Path,
        default=GOLDEN,
        help="where the golden files are (default: golden/ of this repository)",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="models (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MODEL_NAMES))
    if unknown:
        parser.error(f"unknown models {', '.join(unknown)}; choose from {', '.join(MODEL_NAMES)}")
    off_reference = supported_versions.mismatches(supported_versions.table()[REFERENCE_ROW])
    if not args.check and off_reference:
        parser.error(
            f"golden/ is written only by the reference stack ({REFERENCE_ROW} in the README); "
            f"here {'; '.join(off_reference)}. Use --check to compare"
        )
    failed = False
    for name in args.names or MODEL_NAMES:
        differences = rebuild(name, args.directory, write=not args.check)
        for difference in differences:
            print(difference)
        failed = failed or bool(differences)
        verb = "differs" if differences else "unchanged"
        action = "" if args.check or not differences else ", files rewritten"
        print(f"{name}: {verb}{action}", file=sys.stderr)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
