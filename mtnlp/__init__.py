"""mtnlp: multi-task fine-tuning of transformer encoders (MT-DNN style) on accelerate.

Importing mtnlp registers `MultiTaskConfig` / `MultiTaskModel` with transformers' Auto classes,
so `AutoModel.from_pretrained(folder_or_hub_id)` restores a trained multi-task model with every
head, without `trust_remote_code`. Everything above the model layer (cards, metrics, training, the
pipeline, the Hub) loads on first use (PEP 562, as peft does), so `import mtnlp` and loading a
saved model need torch, transformers and safetensors only.
"""

from __future__ import annotations

from mtnlp.modeling import (
    HEADS,
    SHARING,
    TASK_LAYERS,
    MultiTaskConfig,
    MultiTaskModel,
    MultiTaskOutput,
)
from mtnlp.utils.errors import UserError
from mtnlp.utils.lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "TaskCard": "mtnlp.cards",
    "load_card": "mtnlp.cards",
    "load_cards": "mtnlp.cards",
    "METRICS": "mtnlp.metrics",
    "MultiTaskPipeline": "mtnlp.inference",
    "load_model": "mtnlp.inference",
    "train": "mtnlp.training",
    "run": "mtnlp.training",
    "TrainArguments": "mtnlp.training",
    "parse_args": "mtnlp.training",
    "Callback": "mtnlp.training",
    "SAMPLERS": "mtnlp.training",
    "WEIGHTINGS": "mtnlp.training",
    "push_to_hub": "mtnlp.hub",
    "export_onnx": "mtnlp.export.onnx",
}

__all__ = [
    "HEADS",
    "SHARING",
    "TASK_LAYERS",
    "MultiTaskConfig",
    "MultiTaskModel",
    "MultiTaskOutput",
    "UserError",
    *sorted(_LAZY),
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
