"""`transformers.pipeline("mtnlp-multi-task", model=folder)`: `MultiTaskPipeline` behind
transformers' pipeline API, registered with `PIPELINE_REGISTRY` when `mtnlp.inference` is
imported (`import mtnlp` then `mtnlp.MultiTaskPipeline`, or `import mtnlp.inference`).

    import mtnlp.inference
    from transformers import pipeline

    predict = pipeline("mtnlp-multi-task", model="outputs/glue4", device="cpu")
    predict(["A gripping film.", ("A man sleeps.", "Someone is asleep.")], tasks=None)

It takes what `MultiTaskPipeline` takes (a text, a `(text, text_pair)` tuple, a
`{"text": ..., "text_pair": ...}` mapping, or a list of them; `tasks=`), and gives what it gives
(task -> result per input): one encoder pass per batch for every task that reads the input.
`batch_size=`, `max_length=` and `tasks=` (the default tasks) given to `pipeline(...)` are the
pipeline's; `dtype=` and `device=` load and place the model as transformers does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from mtnlp.inference.pipeline import Example, Input, MultiTaskPipeline, as_example
from mtnlp.modeling.auto import PIPELINE_TASK as TASK
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.utils.errors import UserError


class TransformersMultiTaskPipeline(Pipeline):
    """What `transformers.pipeline("mtnlp-multi-task", ...)` builds; `.multitask` is the
    `MultiTaskPipeline` that predicts."""

    _load_tokenizer = True
    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False

    def __init__(
        self, model: MultiTaskModel, *args: Any, max_length: int | None = None, **kwargs: Any
    ) -> None:
        if not isinstance(model, MultiTaskModel):
            raise UserError(
                f'pipeline("{TASK}"): expected an mtnlp model (MultiTaskModel), got '
                f"{type(model).__name__}"
            )
        super().__init__(model, *args, **kwargs)  # places the model on `device`
        if self.tokenizer is None:
            raise UserError(f'pipeline("{TASK}"): no tokenizer (give tokenizer=...)')
        self.tasks = self._forward_params.get("tasks")  # pipeline(..., tasks=[...]): the default
        self.multitask = MultiTaskPipeline(
            self.model,
            self.tokenizer,
            device=self.device,
            batch_size=self._batch_size or 32,
            max_length=max_length,
        )

    def __call__(  # type: ignore[override]
        self, inputs: Input | Sequence[Input], tasks: Sequence[str] | None = None
    ) -> dict[str, dict] | list[dict[str, dict]]:
        """Predictions of `tasks` (default: every task that reads the input's kind) for one
        input or a list (another iterable is read into a list), as `MultiTaskPipeline` gives
        them."""
        self.call_count += 1
        if not isinstance(inputs, (str, tuple, dict, list)):
            inputs = list(inputs)
        return self.multitask(inputs, self.tasks if tasks is None else tasks)

    # transformers' per-input steps (`Pipeline.run_single`): the same predictions, one at a time
    def _sanitize_parameters(self, tasks: Sequence[str] | None = None, **kwargs: Any):
        if kwargs:
            raise UserError(f'pipeline("{TASK}"): unknown argument(s) {", ".join(kwargs)}')
        return {}, {"tasks": tasks}, {}

    def preprocess(self, input_: Input) -> dict[str, Example]:  # type: ignore[override]
        return {"example": as_example(input_, "input 1")}

    def _forward(self, model_inputs: dict[str, Example], tasks=None) -> dict[str, dict]:  # type: ignore[override]
        example = model_inputs["example"]
        value = example.text if example.text_pair is None else (example.text, example.text_pair)
        return self.multitask(value, tasks)

    def postprocess(self, model_outputs: dict[str, dict]) -> dict[str, dict]:  # type: ignore[override]
        return model_outputs


def register() -> None:
    """Make `transformers.pipeline("mtnlp-multi-task", model=...)` build this pipeline. (What
    the text- and token-classification pipelines load for an mtnlp model points here:
    `mtnlp.modeling.auto`.)"""
    if TASK not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=TransformersMultiTaskPipeline, pt_model=MultiTaskModel, type="text"
        )
