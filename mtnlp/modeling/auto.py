"""mtnlp's stand-ins in transformers' single-task Auto classes (registered, with `MultiTaskConfig`
and `MultiTaskModel`, when `mtnlp.modeling` is imported).

`AutoConfig` / `AutoModel` load an mtnlp folder as `MultiTaskConfig` / `MultiTaskModel`. A
multi-task model is no single-task model, so `AutoModelForSequenceClassification` and
`AutoModelForTokenClassification` (and the text- and token-classification pipelines, which load
them) get `SingleTaskStandIn`: its `from_pretrained` / `from_config` raise a `UserError` that
names what works instead, rather than transformers' "Unrecognized configuration class".
"""

from __future__ import annotations

from typing import Any, NoReturn

from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.modeling.heads import HEADS
from mtnlp.utils.errors import UserError

# `transformers.pipeline(PIPELINE_TASK, model=folder)`: registered by `mtnlp.inference`
PIPELINE_TASK = "mtnlp-multi-task"


class SingleTaskStandIn:
    """What a single-task Auto class loads for an mtnlp model: a `UserError` naming the tasks it
    could export (`token_level` picks the tagging tasks) and the multi-task pipelines. (A
    `UserError` is not among the errors after which transformers' pipeline tries other classes,
    so it is the one shown.)"""

    config_class = MultiTaskConfig
    auto_class: str
    token_level: bool

    @classmethod
    def from_pretrained(cls, name: Any, *args: Any, config: Any = None, **kwargs: Any) -> NoReturn:
        raise UserError(cls.message(config, str(name)))

    @classmethod
    def from_config(cls, config: Any, *args: Any, **kwargs: Any) -> NoReturn:
        raise UserError(cls.message(config, "MODEL"))

    _from_config = from_config  # what `AutoModelFor...from_config` calls

    @classmethod
    def message(cls, config: MultiTaskConfig | None, folder: str) -> str:
        tasks = getattr(config, "tasks", None) or []
        names = ", ".join(task["name"] for task in tasks)
        fitting = [
            task["name"] for task in tasks if HEADS.get(task["type"]).token_level == cls.token_level
        ]
        export = (
            f"export a task as one (mtnlp export {folder} OUT --format transformers "
            f"--task {'|'.join(fitting)}, or model.task_model(task)), or "
            if fitting
            else ""
        )
        return (
            f"{folder}: an mtnlp multi-task model ({names}) is not one "
            f'{cls.auto_class}: {export}use transformers.pipeline("{PIPELINE_TASK}", model=...) '
            "(after import mtnlp.inference) or mtnlp.MultiTaskPipeline for every task"
        )


class SequenceClassificationStandIn(SingleTaskStandIn):
    auto_class = AutoModelForSequenceClassification.__name__
    token_level = False


class TokenClassificationStandIn(SingleTaskStandIn):
    auto_class = AutoModelForTokenClassification.__name__
    token_level = True
