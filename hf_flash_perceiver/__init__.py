"""hf-flash-perceiver: Perceiver and Perceiver IO on fused attention, as a transformers plugin.

Importing the package is light (no torch): each public name imports its submodule on first use, and the models are
registered with transformers' Auto classes (`model_type="flash_perceiver"`) as soon as those are imported, before or
after this package.
"""

import importlib
import importlib.util
import sys
from typing import TYPE_CHECKING

from . import _lazy


__version__ = "0.1.0"

if TYPE_CHECKING:
    from .attention_backends import ATTENTION_FUNCTIONS, KeyPaddingMask, attention
    from .configuration_perceiver import PerceiverConfig
    from .context_parallel import context_parallel
    from .input_adapters import (
        PerceiverFlowAdapter,
        PerceiverImageAdapter,
        PerceiverTextAdapter,
        fourier_position_features,
        image_adapter_width,
    )
    from .legacy import Perceiver, PerceiverIO, adapters, convert_flash_perceiver_checkpoint, encodings, utils
    from .modeling_perceiver import (
        PerceiverForImageClassification,
        PerceiverForMaskedLM,
        PerceiverForOpticalFlow,
        PerceiverForSequenceClassification,
        PerceiverIOForRegression,
        PerceiverIOModel,
        PerceiverIOOutput,
        PerceiverModel,
        PerceiverModelOutput,
        PerceiverPreTrainedModel,
    )
    from .transformers_conversion import config_from_transformers, load_transformers_checkpoint

# Public name -> the submodule that defines it, imported on first access (PEP 562 `__getattr__` below).
_EXPORTS = {
    "ATTENTION_FUNCTIONS": "attention_backends",
    "KeyPaddingMask": "attention_backends",
    "attention": "attention_backends",
    "PerceiverConfig": "configuration_perceiver",
    "context_parallel": "context_parallel",
    "PerceiverPreTrainedModel": "modeling_perceiver",
    "PerceiverModel": "modeling_perceiver",
    "PerceiverModelOutput": "modeling_perceiver",
    "PerceiverIOModel": "modeling_perceiver",
    "PerceiverIOOutput": "modeling_perceiver",
    "PerceiverForSequenceClassification": "modeling_perceiver",
    "PerceiverForImageClassification": "modeling_perceiver",
    "PerceiverForMaskedLM": "modeling_perceiver",
    "PerceiverIOForRegression": "modeling_perceiver",
    "PerceiverForOpticalFlow": "modeling_perceiver",
    "PerceiverImageAdapter": "input_adapters",
    "PerceiverFlowAdapter": "input_adapters",
    "PerceiverTextAdapter": "input_adapters",
    "fourier_position_features": "input_adapters",
    "image_adapter_width": "input_adapters",
    # transformers' own Perceiver checkpoints (model_type "perceiver"): from_pretrained converts them on load.
    "config_from_transformers": "transformers_conversion",
    "load_transformers_checkpoint": "transformers_conversion",
    # The flash-perceiver 0.2.0 API (`from hf_flash_perceiver import Perceiver, PerceiverIO, utils`) and its converter.
    "Perceiver": "legacy",
    "PerceiverIO": "legacy",
    "utils": "legacy",
    "adapters": "legacy",
    "encodings": "legacy",
    "convert_flash_perceiver_checkpoint": "legacy",
}

__all__ = [
    "ATTENTION_FUNCTIONS",
    "KeyPaddingMask",
    "attention",
    "PerceiverConfig",
    "context_parallel",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverIOModel",
    "PerceiverIOOutput",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "PerceiverForMaskedLM",
    "PerceiverIOForRegression",
    "PerceiverForOpticalFlow",
    "PerceiverImageAdapter",
    "PerceiverFlowAdapter",
    "PerceiverTextAdapter",
    "fourier_position_features",
    "image_adapter_width",
    "config_from_transformers",
    "load_transformers_checkpoint",
    "Perceiver",
    "PerceiverIO",
    "utils",
    "adapters",
    "encodings",
    "convert_flash_perceiver_checkpoint",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and name.isidentifier() and _find_submodule(name):
        # Submodules (and the former flat-layout paths) stay reachable as attributes, as when all were imported.
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    if f"{__name__}.modeling_perceiver" in sys.modules:
        _lazy.maybe_register(force=True)  # whoever has the models can use the Auto classes too
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _find_submodule(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{__name__}.{name}") is not None
    except (ImportError, ValueError):
        return False


sys.modules[__name__].__class__ = _lazy.Package
_lazy.install()
