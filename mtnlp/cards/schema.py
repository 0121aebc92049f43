"""The task-card schema (pydantic v2): a card is data, validated strictly; every error names
the file and the field.
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mtnlp.metrics import (
    check_metric_fits,
    check_metric_name,
    default_main_metric,
    is_evaluate_module,
    result_keys,
)
from mtnlp.modeling.config import AUXILIARY
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import TASK_LAYERS
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import MAX_NAME_LENGTH, file_name_problem
from mtnlp.utils.untrusted import clip

LOCAL_FORMATS = ("tsv", "csv", "json", "conll", "conllu")


# What a field must look like, used for type errors (pydantic's own words name Python types).
EXPECTED = {
    "labels": "a list of strings",
    "inputs": "a list of one or two column names",
    "metrics": "a list of metric names",
    "main_metric": "a result name or a list of result names",
    "eval_splits": "a list of split names",
    "column_names": "a list of column names",
    "files": "a mapping of split name to file path",
    "columns": "a mapping of card column to file column",
    "splits": "a mapping of split name to Hub split name",
    "split_options": "a mapping of split name to reading options",
    "range": "two numbers [low, high]",
    "class_weights": "a list of positive numbers, one per label, or 'balanced'",
}


BALANCED = "balanced"  # class_weights computed from the training split

TASK_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"  # a task name, also part of file and folder names


def shown(value: str, limit: int = 40) -> str:
    """How a message shows a value from a card or a data file: its `repr` (control characters
    escaped), cut to `limit` characters, since it may be long or hold line breaks."""
    return clip(repr(value), limit)


def split_name_problem(name: str) -> str | None:
    """Why `name` cannot be a split name, or None: a split name can become part of a file name
    (`<task>-<split>.tsv` of `predict --split`), so it is data, never a path."""
    problem = file_name_problem(name)
    return None if problem is None else f"split name {shown(name)} {problem}"


def check_split_names(names: Iterable[str], field: str) -> None:
    """A `ValueError` `<field>: split name ...` for the first of `names` that is no split name."""
    for name in names:
        problem = split_name_problem(name)
        if problem is not None:
            raise ValueError(f"{field}: {problem}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A Hub source names data on the Hub, never a local path: `datasets.load_dataset` would read a
# local folder, file or file builder (`csv`, `json`, ...: the working folder's files) instead.
HUB_ID_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # the Hub's repository name rules
HUB_ID_WORDS = (
    "'namespace/name' or 'name' of letters, digits, '-', '_', '.'; at most 96 characters each, "
    "no '..' or '--'"
)
FILE_BUILDERS = frozenset({
    "arrow", "audiofolder", "cache", "conll", "csv", "eval", "fasta", "fastq", "generator",
    "genbank", "harbor", "hdf5", "iceberg", "imagefolder", "json", "lance", "meshfolder", "mmcif",
    "niftifolder", "pandas", "parquet", "pdb", "pdffolder", "spark", "sql", "text", "tsfile",
    "videofolder", "vortex", "webdataset", "xml",
})  # fmt: skip
"""datasets' packaged builders: `load_dataset("json")` reads the working folder's files."""
LOCAL_DATA = "local files are read through source.local with --data-dir"
HUB_CONFIG_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}")
# datasets' split names (`\w+(\.\w+)*`), each with an optional slice, joined by `+`
_HUB_SPLIT = r"\w+(?:\.\w+)*(?:\[-?\d*%?:-?\d*%?\])?"
HUB_SPLIT = re.compile(rf"{_HUB_SPLIT}(?:\+{_HUB_SPLIT})*", re.ASCII)


def hub_id_problem(value: str) -> str | None:
    """Why `value` is not a Hub dataset id, which `datasets.load_dataset` may read as a local
    path instead, or None."""
    parts = value.split("/")
    if value in FILE_BUILDERS:
        return (
            f"{value!r} is datasets' {value} builder, which reads files of the working folder, "
            f"not a Hub dataset; {LOCAL_DATA}"
        )
    if (
        len(parts) > 2
        or not all(HUB_ID_PART.fullmatch(part) for part in parts)
        or ".." in value
        or "--" in value
    ):
        return f"{shown(value)} is not a Hub dataset id ({HUB_ID_WORDS}); {LOCAL_DATA}"
    if parts[0] == "buckets":  # datasets reads a path that starts with buckets/ as a bucket
        return f"{shown(value)} names a Hub storage bucket, not a dataset"
    return None


class HubSource(_Strict):
    """Where the task lives on the Hugging Face Hub: `datasets.load_dataset(path, name)`. Every
    value names data on the Hub, never a local path."""

    path: str = Field(
        description=f"Hub dataset id, e.g. 'nyu-mll/glue' ({HUB_ID_WORDS}); never a local path "
        "(local files: source.local)"
    )
    name: str | None = Field(None, description="dataset configuration, e.g. 'rte'")
    splits: dict[str, str] = Field(
        default_factory=dict, description="card split name -> Hub split name, when they differ"
    )

    @field_validator("path")
    @classmethod
    def _hub_id(cls, value: str) -> str:
        problem = hub_id_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("name")
    @classmethod
    def _config_name(cls, value: str | None) -> str | None:
        if value is not None and not HUB_CONFIG_NAME.fullmatch(value):
            raise ValueError(
                f"{shown(value)} is not a dataset configuration name (letters, digits, '_', '.', "
                "'+', '=' and '-', at most 100 characters, not starting with '.' or '-')"
            )
        return value

    @field_validator("splits")
    @classmethod
    def _hub_split_names(cls, value: dict[str, str]) -> dict[str, str]:
        for split, hub_split in value.items():
            if len(hub_split) > 200 or not HUB_SPLIT.fullmatch(hub_split):
                raise ValueError(
                    f"{shown(hub_split)} (for split {shown(split)}) is not a Hub split name: "
                    "letters, digits and '_', with an optional slice, e.g. 'validation_matched' "
                    "or 'train[:10%]'"
                )
        return value


class SplitOptions(_Strict):
    """Reading options of one split's file that differ from the source's, e.g. GLUE's CoLA test
    file, which has a header line where the train and dev files have none."""

    header: bool | None = Field(None, description="tsv/csv: the first line names the columns")
    column_names: list[str] | None = Field(None, description="names of the file's columns")
    columns: dict[str, str] | None = Field(None, description="card column -> file column")


# formats whose files name and type their columns: a header, column names or a text encoding
# mean nothing to them
TYPED_FORMATS = ("parquet", "arrow", "save_to_disk")


class LocalSource(_Strict):
    """How to read the same task from local files, relative to `--data-dir`."""

    format: Literal["tsv", "csv", "json", "conll", "conllu", "parquet", "arrow", "save_to_disk"] = (
        Field(
            description="file format; save_to_disk: a folder written by `Dataset.save_to_disk` "
            "(a DatasetDict's: the split's sub-folder)"
        )
    )
    files: dict[str, str] = Field(
        description="split name -> path relative to --data-dir (save_to_disk: a folder)"
    )
    header: bool = Field(True, description="tsv/csv: the first line names the columns")
    column_names: list[str] | None = Field(
        None, description="names of the file's columns (tsv/csv without header, conll)"
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="card column -> file column, where they differ"
    )
    encoding: str = Field("utf-8-sig", description="text encoding (utf-8-sig also drops a BOM)")
    split_options: dict[str, SplitOptions] = Field(
        default_factory=dict, description="split name -> options that differ for its file"
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown text encoding {value!r}") from None
        return value

    @model_validator(mode="after")
    def _safe_split_names(self) -> LocalSource:
        check_split_names(self.files, "files")
        check_split_names(self.split_options, "split_options")
        return self

    @model_validator(mode="after")
    def _files_inside_data_dir(self) -> LocalSource:
        """Data paths stay inside the `--data-dir` folders: no absolute paths, no `..`."""
        for split, file in self.files.items():
            paths = (PurePosixPath(file), PureWindowsPath(file))
            if any(path.anchor for path in paths):  # a root, or a Windows drive
                raise ValueError(
                    f"files.{split}: {file!r} is an absolute path; give a path relative to "
                    "--data-dir"
                )
            if any(".." in path.parts for path in paths):
                raise ValueError(
                    f"files.{split}: {file!r} leaves the --data-dir folder ('..'); give a path "
                    "inside it"
                )
        return self

    @model_validator(mode="after")
    def _typed_columns(self) -> LocalSource:
        """Parquet, Arrow and save_to_disk data name their columns (map them with `columns`)."""
        if self.format not in TYPED_FORMATS:
            return self
        given = [
            name for name in ("header", "column_names", "encoding") if name in self.model_fields_set
        ]
        given += [
            f"split_options.{split}.{name}"
            for split, options in self.split_options.items()
            for name in ("header", "column_names")
            if getattr(options, name) is not None
        ]
        if given:
            raise ValueError(
                f"{given[0]}: not used by format {self.format!r}, whose data name their columns "
                "(map them with 'columns')"
            )
        return self

    @model_validator(mode="after")
    def _needs_column_names(self) -> LocalSource:
        unknown = sorted(set(self.split_options) - set(self.files))
        if unknown:
            raise ValueError(f"split_options: no file for split(s) {', '.join(unknown)}")
        for split in ["", *self.split_options]:
            local = self.for_split(split)
            headerless = local.format == "conll" or not local.header
            # CoNLL-U has ten fixed columns (id, form, lemma, upos, ...); JSON names its fields
            if headerless and local.format not in ("json", "conllu") and not local.column_names:
                field = f"split_options.{split}.column_names" if split else "column_names"
                raise ValueError(f"{field}: required for format {local.format!r} without a header")
        return self

    def for_split(self, split: str) -> LocalSource:
        """The options that read `split`'s file: its `split_options` over the source's."""
        options = self.split_options.get(split)
        if options is None:
            return self
        return self.model_copy(update=options.model_dump(exclude_none=True))


class DataSource(_Strict):
    """Where the task's data comes from: local files (read with `--data-dir`), the Hub (read
    without it), or both."""

    hub: HubSource | None = Field(
        None, description="the task on the Hub, read when no --data-dir is given"
    )
    local: LocalSource | None = Field(
        None, description="the task in local files, read with --data-dir"
    )

    @model_validator(mode="after")
    def _at_least_one(self) -> DataSource:
        if self.hub is None and self.local is None:
            raise ValueError("give at least one of 'hub' and 'local'")
        return self

    @model_validator(mode="after")
    def _safe_hub_split_names(self) -> DataSource:
        if self.hub is not None:
            check_split_names(self.hub.splits, "hub.splits")
        return self


class HeadOptions(_Strict):
    """Options of the task's head; which ones apply depends on the task type."""

    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before the output layer")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="sentence tasks: first token or mean over tokens"
    )
    hidden_size: PositiveInt | None = Field(
        None, description="size of an extra tanh layer before the output (none by default)"
    )


class FinetuneOptions(_Strict):
    """This task's settings for `--finetune-each` (MT-DNN's second stage, the task fine-tuned
    alone from the multi-task model), in place of the run's flags."""

    learning_rate: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="learning rate of the task's fine-tuning run (default: "
        "--finetune-learning-rate, else --learning-rate)",
    )
    epochs: float | None = Field(
        None,
        gt=0.0,
        allow_inf_nan=False,
        description="epochs of the task's fine-tuning run (default: --finetune-epochs; "
        "--finetune-max-steps overrides both)",
    )


class TaskLayerOptions(_Strict):
    """A task's own layer before its head (joint many-task model, Hashimoto et al. 2017)."""

    type: str = Field("bilstm", description="task layer type: " + ", ".join(TASK_LAYERS.names()))
    hidden_size: PositiveInt | None = Field(
        None, description="output size (bilstm: both directions); default: the encoder's"
    )
    num_heads: PositiveInt | None = Field(
        None, description="transformer: attention heads (default: 64 dimensions per head)"
    )
    shortcut: bool = Field(True, description="stacked task: also read the encoder at its layer")
    label_embeddings: bool = Field(
        True, description="stacked task: also read the lower task's predicted label embeddings"
    )
    label_embedding_size: PositiveInt = Field(100, description="size of a label embedding")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout on the task layer's input")

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TASK_LAYERS:
            raise ValueError(TASK_LAYERS.unknown_message(value))
        return value


class Submission(_Strict):
    """How `mtnlp predict --split` writes a split's predictions: a TSV file per split with the
    header `index<TAB>prediction` (the GLUE benchmark's submission format)."""

    files: dict[str, str] = Field(
        default_factory=dict,
        description="split name -> file name in --output-dir (default: <task>.tsv, or "
        "<task>-<split>.tsv for one of several splits)",
    )
    label_format: Literal["name", "index"] = Field(
        "name", description="classification: write the label's name or its index"
    )
    index_column: str = Field(
        "index", description="column of example ids (without it: the example's position)"
    )

    @model_validator(mode="after")
    def _safe_file_names(self) -> Submission:
        """Split and file names are data, never paths (`file_name_problem`); two splits never
        share a file (nor two names that differ only in case, which are one file on macOS and
        Windows)."""
        check_split_names(self.files, "files")
        splits: dict[str, str] = {}  # file name, case-folded -> its split
        for split, file in self.files.items():
            problem = file_name_problem(file)
            if problem is not None:
                raise ValueError(f"files.{split}: file name {shown(file)} {problem}")
            other = splits.setdefault(file.casefold(), split)
            if other != split:
                raise ValueError(f"files.{split}: {file} is also the file of split {other}")
        return self


MAIN = "main"  # a task's role (`TaskCard.role`), else AUXILIARY
MAX_BINS = 1000  # bins of a derived task: its labels


def bin_names(bins: int) -> list[str]:
    """The label names of a task derived as `bins` ordered bins: '0' (lowest) to str(bins - 1)."""
    return [str(index) for index in range(bins)]


def check_range(value: list[float]) -> None:
    """A `ValueError` unless `value` is two finite numbers [low, high], low below high."""
    if len(value) != 2 or not all(map(math.isfinite, value)):
        raise ValueError("give two finite numbers [low, high]")
    if not value[0] < value[1]:
        raise ValueError(f"low ({value[0]:g}) must be below high ({value[1]:g})")


class DeriveOptions(_Strict):
    """A task learned from another card's data and target (quantisation smoothing, Ruder 2017):
    `bins` learns a regression target again as ordered bins (a classification task), and
    `regression` learns a graded label again as a regression on its index."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    parent: str = Field(
        alias="from",
        pattern=TASK_NAME,
        max_length=MAX_NAME_LENGTH,
        description="the card (among those loaded together) whose data and target this task "
        "learns again; not itself a derived card",
    )
    kind: Literal["bins", "regression"] = Field(
        description="bins: a regression target as ordered bins (classification); regression: a "
        "graded classification label as a regression on its index"
    )
    bins: int | None = Field(
        None, ge=2, le=MAX_BINS, description="bins: the number of ordered bins (at least 2)"
    )
    range: list[float] | None = Field(
        None,
        description="bins: [low, high], split into equal bins (default: the parent's range, "
        "else the training split's lowest and highest value)",
    )
    labels: list[str] | None = Field(
        None,
        description="regression: the parent's label names in grade order, label i's target "
        "being i (default: the parent's labels)",
    )

    @model_validator(mode="after")
    def _options_of_kind(self) -> DeriveOptions:
        if self.kind == "bins" and self.bins is None:
            raise ValueError("bins: required for kind 'bins' (the number of bins, at least 2)")
        given = {"bins": self.bins, "range": self.range, "labels": self.labels}
        own = ("bins", "range") if self.kind == "bins" else ("labels",)
        extra = [name for name, value in given.items() if value is not None and name not in own]
        if extra:
            raise ValueError(f"{extra[0]}: not an option of kind {self.kind!r}; remove it")
        if self.range is not None:
            try:
                check_range(self.range)
            except ValueError as error:
                raise ValueError(f"range: {error}") from None
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels: label names must be unique")
        return self


class TaskCard(_Strict):
    """One task: what to read, how to encode it, which head learns it and how it is scored."""

    name: str = Field(pattern=TASK_NAME, max_length=MAX_NAME_LENGTH, description="unique task name")
    type: str = Field(description="task type: " + ", ".join(HEADS.names()))
    description: str = Field("", description="one line for people and the model card")
    role: Literal["main", "auxiliary"] = Field(
        MAIN,
        description="main, or auxiliary: trained and logged, but not used for model selection "
        "(--keep-best), --finetune-each, the mean dev score, the pipeline's default tasks or the "
        "model card's results (a derived card: auxiliary unless given)",
    )
    derive: DeriveOptions | None = Field(
        None,
        description="learn another card's data and target again: {from: <card>, kind: bins, "
        "bins: <n>} or {from: <card>, kind: regression}; the data fields come from that card",
    )
    source: DataSource = Field(description="where the data comes from")
    inputs: list[str] = Field(min_length=1, max_length=2, description=EXPECTED["inputs"])
    label_column: str = Field("label", description="column holding the target")
    labels: list[str] | None = Field(
        None,
        description="label names (classification, tagging); a data value is the label of that "
        "name (a number as its digits: 3 is label '3'); an integer is read as an index into "
        "this list only when no label name is an integer (GLUE's 0/1 files)",
    )
    range: list[float] | None = Field(
        None,
        description="regression: [low, high], the values a prediction is clipped to, e.g. "
        "[0, 5] for STS-B",
    )
    metrics: list[str] = Field(min_length=1, description="metric names, e.g. accuracy, f1")
    main_metric: str | list[str] | None = Field(
        None,
        description="the result that ranks dev results (a list: their mean); default by task",
    )
    head: HeadOptions = Field(default_factory=HeadOptions, description="head options")
    layer: int = Field(-1, description="encoder layer the head reads (negative: from the top)")
    stack_on: str | None = Field(
        None,
        pattern=TASK_NAME,
        max_length=MAX_NAME_LENGTH,
        description="task whose task layer and predicted labels this task builds on (JMT)",
    )
    task_layer: TaskLayerOptions | None = Field(
        None, description="the task's own layer before its head (default: a bilstm if stacked)"
    )
    successive_regularization: float = Field(
        0.0, ge=0.0, description="JMT successive regularization delta toward stack_on's update"
    )
    cluster: str | None = Field(
        None,
        pattern=TASK_NAME,
        max_length=MAX_NAME_LENGTH,
        description="the task's cluster for `--task-clusters cards` (task clustering "
        "regularization): tasks that name the same cluster are pulled together",
    )
    max_length: PositiveInt = Field(128, description="maximum tokens per example")
    loss_weight: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="multiplies this task's loss in the training objective, under every "
        "--weighting (static: the task's fixed weight)",
    )
    class_weights: list[float] | str | None = Field(
        None,
        description="classification, tagging: the weight of each label in the cross-entropy "
        "(one positive number per label, in the order of 'labels'), or 'balanced': n_examples / "
        "(n_labels * n_examples_of_label), counted on the training split (tagging: its labelled "
        "tokens), as sklearn's compute_class_weight('balanced')",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="classification, tagging: label smoothing of the cross-entropy (torch's "
        "label_smoothing)",
    )
    finetune: FinetuneOptions | None = Field(
        None, description="this task's --finetune-each settings: learning_rate, epochs"
    )
    sampling_weight: float = Field(1.0, ge=0.0, description="weight for the 'specified' sampler")
    train_split: str = Field("train", description="split used for training")
    eval_splits: list[str] = Field(
        default_factory=lambda: ["validation"], min_length=1, description="dev splits"
    )
    submission: Submission = Field(
        default_factory=Submission, description="prediction files of `mtnlp predict --split`"
    )

    _path: Path | None = PrivateAttr(None)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in HEADS:
            raise ValueError(HEADS.unknown_message(value))
        return value

    @field_validator("train_split", "eval_splits")
    @classmethod
    def _safe_split_names(cls, value: str | list[str]) -> str | list[str]:
        for name in [value] if isinstance(value, str) else value:
            problem = split_name_problem(name)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("label names must be unique")
        return value

    @field_validator("range")
    @classmethod
    def _low_below_high(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            check_range(value)
        return value

    @field_validator("class_weights")
    @classmethod
    def _weights_or_balanced(cls, value: list[float] | str | None) -> list[float] | str | None:
        if isinstance(value, str) and value != BALANCED:
            raise ValueError(f"expected {EXPECTED['class_weights']}, got {shown(value)}")
        for number, weight in enumerate(value if isinstance(value, list) else []):
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"weight {number + 1} is {weight:g}; each must be positive")
        return value

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str]) -> list[str]:
        for name in value:
            check_metric_name(name)
        return value

    @model_validator(mode="after")
    def _labels_match_type(self) -> TaskCard:
        head = HEADS.get(self.type)
        if head.needs_labels and not self.labels:
            raise ValueError(f"labels: required for a {self.type} task (a list of strings)")
        if not head.needs_labels and self.labels:
            raise ValueError(f"labels: a {self.type} task has no label names; remove 'labels'")
        if self.range is not None and self.type != "regression":
            raise ValueError(f"range: a {self.type} task has no values to clip; remove 'range'")
        if head.needs_labels and len(self.labels) < 2 and self.type == "classification":
            raise ValueError("labels: a classification task needs at least two labels")
        self._check_loss_options(head.needs_labels)
        splits = {self.train_split, *self.eval_splits}
        if self.source.local is not None:
            missing = sorted(splits - set(self.source.local.files))
            if missing:
                raise ValueError(f"source.local.files: no file for split(s) {', '.join(missing)}")
        return self

    def _check_loss_options(self, has_labels: bool) -> None:
        """Class weights and label smoothing act on labels: a task with label names only."""
        for name in ("class_weights", "label_smoothing"):
            if not has_labels and getattr(self, name):
                raise ValueError(f"{name}: a {self.type} task has no labels; remove '{name}'")
        weights = self.class_weights
        if isinstance(weights, list) and len(weights) != len(self.labels):
            raise ValueError(
                f"class_weights: expected one weight per label ({len(self.labels)}), got "
                f"{len(weights)}"
            )

    @model_validator(mode="after")
    def _derived(self) -> TaskCard:
        """A derived task's type and labels are those its kind learns."""
        derive = self.derive
        if derive is None:
            return self
        if derive.parent == self.name:
            raise ValueError("derive.from: a task cannot derive from itself")
        wanted = "classification" if derive.kind == "bins" else "regression"
        if self.type != wanted:
            raise ValueError(f"type: a task derived as {derive.kind} is a {wanted} task")
        names = bin_names(derive.bins) if derive.kind == "bins" else None
        if names is not None and self.labels != names:
            listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ValueError(
                f"labels: a task derived as {derive.bins} bins has the labels {listed} (leave "
                "'labels' out)"
            )
        return self

    @model_validator(mode="after")
    def _stacking(self) -> TaskCard:
        if self.stack_on == self.name:
            raise ValueError("stack_on: a task cannot stack on itself")
        if self.successive_regularization > 0 and self.stack_on is None:
            raise ValueError("successive_regularization: needs stack_on (the task it is pulled to)")
        return self

    @model_validator(mode="after")
    def _fits_type(self) -> TaskCard:
        """Inputs and metrics that the task type can use; a main metric its metrics produce."""
        if HEADS.get(self.type).token_level and len(self.inputs) != 1:
            raise ValueError(
                f"inputs: a {self.type} task reads one column of words, not {len(self.inputs)}"
            )
        num_labels = len(self.labels) if self.labels else None
        for name in self.metrics:
            try:
                check_metric_fits(name, self.name, self.type, num_labels)
            except ValueError as error:
                raise ValueError(f"metrics: {error}") from None
        if self.main_metric == []:
            raise ValueError("main_metric: give a result name or a non-empty list of them")
        if any(map(is_evaluate_module, self.metrics)):
            return self  # an evaluate module's result names are known only when it runs
        keys = result_keys(self.metrics)
        unknown = [key for key in self._main_metric_list() or () if key not in keys]
        if unknown:
            raise ValueError(
                f"main_metric: {unknown[0]!r} is not a result of the card's metrics "
                f"({', '.join(keys)})"
            )
        return self

    @property
    def path(self) -> Path | None:
        """The YAML file this card was read from (None for cards built in code)."""
        return self._path

    @property
    def where(self) -> str:
        """How error messages name this card: its file, or its task name."""
        return str(self._path) if self._path is not None else f"task {self.name}"

    def replace(self, **fields: Any) -> TaskCard:
        """A copy with `fields` replaced (cards are immutable), validated as a card file is: an
        unknown field or a value that does not fit is a `UserError` naming this card's file and
        the field. The copy keeps this card's file (`path`, `where`). Nested options take a
        mapping or their model, e.g. `card.replace(layer=4, task_layer={"type": "bilstm"})`."""
        data = {**self.model_dump(exclude_defaults=True), **fields}
        try:
            card = type(self).model_validate(data)
        except ValidationError as error:
            raise UserError(card_errors(error, self.where)) from None
        card._path = self._path
        return card

    def _main_metric_list(self) -> list[str] | None:
        if self.main_metric is None:
            return None
        return [self.main_metric] if isinstance(self.main_metric, str) else self.main_metric

    def resolved_main_metric(self) -> list[str] | None:
        """The result names whose mean ranks dev results: the card's `main_metric`, else the
        default for its metrics (`metrics.default_main_metric`)."""
        return self._main_metric_list() or default_main_metric(self.metrics)

    def resolved_task_layer(self) -> dict[str, Any] | None:
        """The task layer's options: a stacked task without `task_layer` gets the defaults."""
        if self.task_layer is None and self.stack_on is None:
            return None
        return (self.task_layer or TaskLayerOptions()).model_dump()

    def model_spec(self) -> dict[str, Any]:
        """What the model needs to know about the task (stored in the model config as JSON)."""
        return {
            "name": self.name,
            "type": self.type,
            "labels": self.labels,
            "layer": self.layer,
            "stack_on": self.stack_on,
            "task_layer": self.resolved_task_layer(),
            "head": self.head.model_dump(),
            **({"loss": loss} if (loss := self.loss_options()) else {}),  # the head's loss
            "inputs": self.inputs,
            "metrics": self.metrics,
            "main_metric": self.resolved_main_metric(),
            "max_length": self.max_length,  # the pipeline truncates as training did
            **({"range": list(self.range)} if self.range is not None else {}),  # decode clips
            **({"input_columns": self.input_columns()} if self.input_columns() else {}),
            **({"role": AUXILIARY} if self.role == AUXILIARY else {}),  # default task lists
        }

    def loss_options(self) -> dict[str, Any]:
        """The head's loss options where the card sets any (the model config stores them, so a
        saved model computes the loss it was trained with): `class_weights` (a list, or
        'balanced', which training resolves from the training split) and `label_smoothing`."""
        if self.class_weights is None and not self.label_smoothing:
            return {}
        return {"class_weights": self.class_weights, "label_smoothing": self.label_smoothing}

    def input_columns(self) -> dict[str, str]:
        """Input column -> the data files' column where `source.local.columns` renames it (what
        `mtnlp predict --input` rows name, as the card's files do)."""
        local = self.source.local
        renames = local.columns if local is not None else {}
        inputs = set(self.inputs)
        return {ours: file for ours, file in renames.items() if ours in inputs and file != ours}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True), sort_keys=False)


# ------------------------------------------------------------------------------ error wording
def card_errors(error: ValidationError, where: str) -> str:
    """A card's validation errors, one line each: `<where>: <field>: <message>`."""
    lines = [f"{where}: {field}: {message}" for field, message in map(_describe, error.errors())]
    return "\n".join(dict.fromkeys(lines))


def _known_fields(loc: list[str]) -> list[str]:
    """The fields of the (sub-)schema that holds the field at `loc`, e.g. `head` -> HeadOptions."""
    schema: Any = TaskCard
    for part in loc[:-1]:
        annotation = schema.model_fields[part].annotation if part in schema.model_fields else None
        kinds = (annotation, *get_args(annotation))
        schema = next((t for t in kinds if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if schema is None:
            return []
    return [field.alias or name for name, field in schema.model_fields.items()]


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    """(field path, message) for one pydantic error, in words a card author understands."""
    loc = [str(part) for part in error["loc"]]
    field = ".".join(loc) if loc else "(card)"
    kind = error["type"]
    if kind == "missing":
        return field, "required field is missing"
    if kind == "extra_forbidden":
        return field, f"unknown field; known: {', '.join(_known_fields(loc))}"
    top = loc[-1] if loc and loc[-1] in EXPECTED else next((p for p in loc if p in EXPECTED), None)
    if top is not None and kind.endswith(("_type", "_parsing")):
        return ".".join(loc[: loc.index(top) + 1]), f"expected {EXPECTED[top]}"
    message = error["msg"].removeprefix("Value error, ")
    # validators of a whole (sub-)model start their message with the field they are about
    named = re.match(r"^([a-z_]+(?:\.[\w-]+)*): (.*)$", message)
    own_fields = {
        *TaskCard.model_fields,
        *DataSource.model_fields,
        *LocalSource.model_fields,
        *DeriveOptions.model_fields,
    }
    if named and named[1].split(".")[0] in own_fields:
        field = named[1] if field == "(card)" else f"{field}.{named[1]}"
        message = named[2]
    return field, message
