"""Parameter-sharing strategies: which encoder parameters the tasks share (`--sharing`).

Ruder 2017 ("An Overview of Multi-Task Learning in Deep Neural Networks") contrasts hard sharing
(one encoder, one head per task: MT-DNN, the default `hard`) with soft sharing, where each task has
its own parameters and a penalty or learned mixing ties them together. The column strategies here
keep the bottom of a BERT-like encoder shared, once, and give every task its own copy ("column")
of the top N layers (`layers`, default 2), each starting as a copy of the pretrained layers:

- `soft`: independent columns whose corresponding parameters are kept close by a penalty: the
  squared L2 distance (Duong et al. 2015, "Low Resource Dependency Parsing: Cross-lingual
  Parameter Sharing in a Neural Network Parser") or the trace norm of the stacked parameters
  (Yang & Hospedales 2017, "Trace Norm Regularised Deep Multi-Task Learning").
- `cross_stitch` (Misra et al. 2016, "Cross-stitch Networks for Multi-task Learning"): after
  each column layer, a learned T x T matrix mixes the tasks' outputs (initialized near identity).
- `sluice` (Ruder et al. 2019, "Latent Multi-task Architecture Learning"): each column layer's
  output is split into subspaces mixed across tasks by learned alphas; learned betas mix the
  layers' outputs into the head input; an orthogonality penalty pushes a task's subspaces apart.
- `tensor` (Yang & Hospedales 2017, "Deep Multi-task Representation Learning: A Tensor
  Factorisation Approach"): each column's linear weights are the task's slice of a
  Tucker-factorised tensor shared by the tasks plus a shared residual (`tensor.py`).

The encoder module itself stays complete (its top N layers are kept but not run), so a column
model still has a whole encoder to start another model from. Each strategy registers the typed
class of its options as `config_class` (as peft registers a config class with each tuner); the
model config stores the strategy as a plain dict (`{"name": ..., options}`, every option filled
in), so `from_pretrained` rebuilds it. This module imports only torch, transformers and mtnlp's
modeling-side modules, and speaks in option names: the training layer maps its flags to them
(`mtnlp.training.args`).
"""

from mtnlp.modeling.sharing import columns, tensor  # noqa: F401  (register the column strategies)
from mtnlp.modeling.sharing.base import (
    SHARING,
    HardSharing,
    SharingConfig,
    SharingMismatch,
    SharingStrategy,
    build_sharing,
    describe_sharing,
    resolve_sharing,
)
from mtnlp.modeling.sharing.columns import (
    SOFT_PENALTIES,
    ColumnSharing,
    CrossStitchSharing,
    SluiceSharing,
    SoftSharing,
    l2_distance_penalty,
    orthogonality_penalty,
    trace_norm_penalty,
)
from mtnlp.modeling.sharing.tensor import TensorSharing, truncated_hosvd

__all__ = [
    "SHARING",
    "SOFT_PENALTIES",
    "ColumnSharing",
    "CrossStitchSharing",
    "HardSharing",
    "SharingConfig",
    "SharingMismatch",
    "SharingStrategy",
    "SluiceSharing",
    "SoftSharing",
    "TensorSharing",
    "build_sharing",
    "describe_sharing",
    "l2_distance_penalty",
    "orthogonality_penalty",
    "resolve_sharing",
    "trace_norm_penalty",
    "truncated_hosvd",
]
