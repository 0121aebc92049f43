"""mtnlp: multi-task fine-tuning of transformer encoders (MT-DNN style) on accelerate.

Importing mtnlp registers `MultiTaskConfig` / `MultiTaskModel` with transformers' Auto classes,
so `AutoModel.from_pretrained(folder_or_hub_id)` restores a trained multi-task model with every
head, without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel

from mtnlp.cards import TaskCard, load_card, load_cards
from mtnlp.errors import UserError
from mtnlp.heads import HEADS
from mtnlp.metrics import METRICS
from mtnlp.modeling import MultiTaskConfig, MultiTaskModel, MultiTaskOutput
from mtnlp.pipeline import MultiTaskPipeline

AutoConfig.register(MultiTaskConfig.model_type, MultiTaskConfig, exist_ok=True)
AutoModel.register(MultiTaskConfig, MultiTaskModel, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "HEADS",
    "METRICS",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "MultiTaskPipeline",
    "TaskCard",
    "UserError",
    "load_card",
    "load_cards",
]
