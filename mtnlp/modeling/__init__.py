"""A saved model's code: `MultiTaskConfig`, `MultiTaskModel`, the heads, task layers and sharing
strategies. Imports only torch, transformers, safetensors and itself, so a saved model loads
anywhere; importing it registers the model with transformers' Auto classes (and, in the
single-task ones, stand-ins whose error names what to use instead: `auto.py`)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from mtnlp.modeling.auto import SequenceClassificationStandIn, TokenClassificationStandIn
from mtnlp.modeling.config import MultiTaskConfig, MultiTaskOutput
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import TASK_LAYERS
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.sharing import SHARING

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)
# a multi-task model is no single-task model: these say what to use instead
AutoModelForSequenceClassification.register(
    MultiTaskConfig, SequenceClassificationStandIn, exist_ok=True
)
AutoModelForTokenClassification.register(MultiTaskConfig, TokenClassificationStandIn, exist_ok=True)

__all__ = [
    "HEADS",
    "SHARING",
    "TASK_LAYERS",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
]
