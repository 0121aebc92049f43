"""Training: `run` (MT-DNN's stages) > `train` (the loop) > set-up > callbacks and mixing > the
step, checkpoints and arguments > the run's state > components (samplers, weightings,
regularizers, affinity, selection). Names load lazily (PEP 562), so `mtnlp.training.args` alone
stays light."""

from __future__ import annotations

from mtnlp.utils.lazy import lazy_exports

_LAZY = {
    "run": "mtnlp.training.stages",
    "train": "mtnlp.training.loop",
    "TrainArguments": "mtnlp.training.args",
    "parse_args": "mtnlp.training.args",
    "Callback": "mtnlp.training.callbacks",
    "SAMPLERS": "mtnlp.training.samplers",
    "WEIGHTINGS": "mtnlp.training.weighting",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
