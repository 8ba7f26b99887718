"""hf-flash-perceiver: Perceiver and Perceiver IO on fused attention, as a transformers plugin.

Importing the package registers the models with transformers' Auto classes (`model_type="flash_perceiver"`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from .attention_backends import ATTENTION_FUNCTIONS, KeyPaddingMask, attention
from .configuration_perceiver import PerceiverConfig
from .context_parallel import context_parallel
from .input_adapters import PerceiverImageAdapter, PerceiverTextAdapter, fourier_position_features
from .modeling_perceiver import (
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
    PerceiverIOModel,
    PerceiverIOOutput,
    PerceiverModel,
    PerceiverModelOutput,
    PerceiverPreTrainedModel,
)

# The flash-perceiver 0.2.0 API (`from hf_flash_perceiver import Perceiver, PerceiverIO, utils`) and its converter.
from .legacy import Perceiver, PerceiverIO, adapters, convert_flash_perceiver_checkpoint, encodings, utils


__version__ = "0.1.0"

# transformers ships its own `PerceiverConfig`/`PerceiverModel` (model_type "perceiver"); ours registers under
# "flash_perceiver". exist_ok=True keeps re-imports (and a reload in a notebook) from failing.
AutoConfig.register(PerceiverConfig.model_type, PerceiverConfig, exist_ok=True)
AutoModel.register(PerceiverConfig, PerceiverModel, exist_ok=True)
AutoModelForSequenceClassification.register(PerceiverConfig, PerceiverForSequenceClassification, exist_ok=True)
# Every head with a task Auto class is registered: for an unregistered class, transformers' Auto mappings resolve
# by config class *name* and would reach its own PerceiverForImageClassification / PerceiverForMaskedLM. The IO
# models have no task Auto class (AutoModel is the encoder); they load by class, or through a saved `auto_map`.
AutoModelForImageClassification.register(PerceiverConfig, PerceiverForImageClassification, exist_ok=True)
AutoModelForMaskedLM.register(PerceiverConfig, PerceiverForMaskedLM, exist_ok=True)

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
    "PerceiverImageAdapter",
    "PerceiverTextAdapter",
    "fourier_position_features",
    "Perceiver",
    "PerceiverIO",
    "utils",
    "adapters",
    "encodings",
    "convert_flash_perceiver_checkpoint",
]
