"""use_in_qkeras: QKeras's own code calls bnfold's functions, without editing a call site.

Changing one import switches a script's own calls. QKeras's modules are another
matter: ``qkeras.estimate`` binds ``unfold_model`` when QKeras is imported, so
``print_qstats`` and the accumulator analyses keep calling QKeras's unfold (which
skips folded dense layers and fails on several inputs or nested models) unless
that binding is replaced too. And ``print_qstats`` goes on to
``qkeras.utils.model_save_quantized_weights``, which knows QKeras's two folded
convolutions by class: on bnfold's ``QDenseBatchnorm`` it sets two quantized
weights on a layer that has seven, and fails.
"""

from __future__ import annotations

import sys
from typing import Any

import bnfold
from bnfold.keras import qkeras
from bnfold.layers import QDenseBatchnorm
from bnfold.mac import quantized_weights

_qkeras_save_quantized_weights = qkeras.utils.model_save_quantized_weights


class _LayersLeftOut:
    """A model as QKeras's weight saver reads it (its layers, its save_weights), minus some."""

    def __init__(self, model: Any, left_out: list[Any]) -> None:
        self.layers = [layer for layer in model.layers if all(layer is not x for x in left_out)]
        self.save_weights = model.save_weights


def model_save_quantized_weights(model: Any, filename: str | None = None) -> dict[str, Any]:
    """QKeras's ``model_save_quantized_weights``, treating ``QDenseBatchnorm`` as its folded convs.

    As QKeras does for ``QConv2DBatchnorm``, a folded dense layer's entry holds its
    folded, then quantized, kernel and bias, and the layer's own weights are left alone
    (the batchnorm is folded before quantization, so they cannot be quantized apart).
    """
    folded_dense = [layer for layer in model.layers if isinstance(layer, QDenseBatchnorm)]
    saved = _qkeras_save_quantized_weights(_LayersLeftOut(model, folded_dense), filename)
    for layer in folded_dense:
        weights = quantized_weights(layer)
        saved[layer.name] = {
            "weights": [value for value in (weights.kernel, weights.bias) if value is not None]
        }
    return saved


# QKeras's function and the one that replaces it, wherever a QKeras module bound it.
_REPLACEMENTS = [
    *(
        (getattr(qkeras.bn_folding_utils, name), getattr(bnfold, name))
        for name in (
            "convert_folded_layer_to_unfolded",
            "populate_bias_quantizer_from_accumulator",
            "unfold_model",
        )
    ),
    (_qkeras_save_quantized_weights, model_save_quantized_weights),
]


def use_in_qkeras() -> list[str]:
    """Route ``qkeras.bn_folding_utils``'s three functions to bnfold's, wherever QKeras bound them.

    Replaces ``qkeras.bn_folding_utils.unfold_model``,
    ``populate_bias_quantizer_from_accumulator`` and ``convert_folded_layer_to_unfolded``
    by bnfold's functions of the same names and signatures, and so does every name a
    loaded QKeras module bound to them at import time (``qkeras.estimate.unfold_model``,
    which ``print_qstats`` calls, and ``qkeras.unfold_model``). QKeras's
    ``model_save_quantized_weights`` (which ``print_qstats`` also calls) is replaced by
    one that handles bnfold's ``QDenseBatchnorm`` as QKeras handles its folded
    convolutions. Existing code that calls QKeras's functions, and QKeras's tools that
    call them, then run bnfold's without editing a call site. The change lasts for the
    process; calling again changes nothing.

    Returns:
        The names this call replaced, e.g. ``"qkeras.estimate.unfold_model"``.
    """
    replaced = []
    for module_name, module in sorted(sys.modules.items()):
        if module is None or module_name.partition(".")[0] != qkeras.__name__:
            continue
        for name, value in list(vars(module).items()):
            for qkeras_function, replacement in _REPLACEMENTS:
                if value is qkeras_function:
                    setattr(module, name, replacement)
                    replaced.append(f"{module_name}.{name}")
    return replaced
