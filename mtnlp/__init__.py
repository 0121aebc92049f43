"""mtnlp: multi-task fine-tuning of transformer encoders (MT-DNN style) on accelerate.

Importing mtnlp registers `MultiTaskConfig` / `MultiTaskModel` with transformers' Auto classes,
so `AutoModel.from_pretrained(folder_or_hub_id)` restores a trained multi-task model with every
head, without `trust_remote_code`. The registration follows transformers: `mtnlp.modeling` (which
registers) is imported now if transformers already is, else right after transformers is imported
(`mtnlp.utils.lazy.import_after`), so it holds whichever comes first and `import mtnlp` itself
loads neither torch nor transformers: `mtnlp --help` starts in a fraction of a second. Every
public name loads on first use (PEP 562, as peft does).
"""

from __future__ import annotations

from mtnlp.utils.errors import UserError
from mtnlp.utils.lazy import import_after, lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "HEADS": "mtnlp.modeling",
    "SHARING": "mtnlp.modeling",
    "TASK_LAYERS": "mtnlp.modeling",
    "MultiTaskConfig": "mtnlp.modeling",
    "MultiTaskModel": "mtnlp.modeling",
    "MultiTaskOutput": "mtnlp.modeling",
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

__all__ = ["UserError", *sorted(_LAZY)]

import_after("transformers", "mtnlp.modeling")  # the Auto registration

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
