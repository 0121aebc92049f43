"""Using a trained model: the one-pass multi-task pipeline, `mtnlp predict`'s rows and
submission files, dev evaluation, loading a model folder.

Importing it registers the pipeline with transformers, so that
`transformers.pipeline("mtnlp-multi-task", model=folder)` builds it."""

from mtnlp.inference import transformers_pipeline
from mtnlp.inference.loading import load_model
from mtnlp.inference.pipeline import MultiTaskPipeline

transformers_pipeline.register()

__all__ = ["MultiTaskPipeline", "load_model"]
