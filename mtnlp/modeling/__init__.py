"""A saved model's code: `MultiTaskConfig`, `MultiTaskModel`, the heads, task layers and sharing
strategies. Imports only torch, transformers, safetensors and itself, so a saved model loads
anywhere; importing it registers the model with transformers' Auto classes."""

from transformers import AutoConfig, AutoModel

from mtnlp.modeling.config import MultiTaskConfig, MultiTaskOutput
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import TASK_LAYERS
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.sharing import SHARING

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)

__all__ = [
    "HEADS",
    "SHARING",
    "TASK_LAYERS",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
]
