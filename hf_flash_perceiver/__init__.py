"""hf-flash-perceiver: Perceiver and Perceiver IO on fused attention, as a transformers plugin.

Importing the package registers the models with transformers' Auto classes (`model_type="flash_perceiver"`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .attention import ATTENTION_FUNCTIONS, KeyPaddingMask, attention
from .configuration_perceiver import PerceiverConfig
from .modeling_perceiver import (
    PerceiverForSequenceClassification,
    PerceiverIOModel,
    PerceiverIOOutput,
    PerceiverModel,
    PerceiverModelOutput,
    PerceiverPreTrainedModel,
)


__version__ = "0.1.0"

# transformers ships its own `PerceiverConfig`/`PerceiverModel` (model_type "perceiver"); ours registers under
# "flash_perceiver". exist_ok=True keeps re-imports (and a reload in a notebook) from failing.
AutoConfig.register(PerceiverConfig.model_type, PerceiverConfig, exist_ok=True)
AutoModel.register(PerceiverConfig, PerceiverModel, exist_ok=True)
AutoModelForSequenceClassification.register(PerceiverConfig, PerceiverForSequenceClassification, exist_ok=True)

__all__ = [
    "ATTENTION_FUNCTIONS",
    "KeyPaddingMask",
    "attention",
    "PerceiverConfig",
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverIOModel",
    "PerceiverIOOutput",
    "PerceiverForSequenceClassification",
]
