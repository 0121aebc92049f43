"""The task-card schema (pydantic v2): a card is data, validated strictly; every error names
the file and the field.
"""

from __future__ import annotations

import codecs
import math
import re
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
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.hierarchy import TASK_LAYERS
from mtnlp.utils.errors import UserError

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
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(_Strict):
    """Where the task lives on the Hugging Face Hub: `datasets.load_dataset(path, name)`."""

    path: str = Field(description="Hub dataset id, e.g. 'nyu-mll/glue'")
    name: str | None = Field(None, description="dataset configuration, e.g. 'rte'")
    splits: dict[str, str] = Field(
        default_factory=dict, description="card split name -> Hub split name, when they differ"
    )


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


class HeadOptions(_Strict):
    """Options of the task's head; which ones apply depends on the task type."""

    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout before the output layer")
    pooling: Literal["cls", "mean"] = Field(
        "cls", description="sentence tasks: first token or mean over tokens"
    )
    hidden_size: PositiveInt | None = Field(
        None, description="size of an extra tanh layer before the output (none by default)"
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

    @field_validator("files")
    @classmethod
    def _plain_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value.values():
            if not name or Path(name).name != name or name.startswith("."):
                raise ValueError(f"{name!r} must be a file name, not a path")
        return value


class TaskCard(_Strict):
    """One task: what to read, how to encode it, which head learns it and how it is scored."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", description="unique task name")
    type: str = Field(description="task type: " + ", ".join(HEADS.names()))
    description: str = Field("", description="one line for people and the model card")
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
        None, description="task whose task layer and predicted labels this task builds on (JMT)"
    )
    task_layer: TaskLayerOptions | None = Field(
        None, description="the task's own layer before its head (default: a bilstm if stacked)"
    )
    successive_regularization: float = Field(
        0.0, ge=0.0, description="JMT successive regularization delta toward stack_on's update"
    )
    max_length: PositiveInt = Field(128, description="maximum tokens per example")
    loss_weight: float = Field(1.0, ge=0.0, description="weight of this task's loss")
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

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("label names must be unique")
        return value

    @field_validator("range")
    @classmethod
    def _low_below_high(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 2 or not all(map(math.isfinite, value))):
            raise ValueError("give two finite numbers [low, high]")
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"low ({value[0]:g}) must be below high ({value[1]:g})")
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
        splits = {self.train_split, *self.eval_splits}
        if self.source.local is not None:
            missing = sorted(splits - set(self.source.local.files))
            if missing:
                raise ValueError(f"source.local.files: no file for split(s) {', '.join(missing)}")
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
            "inputs": self.inputs,
            "metrics": self.metrics,
            "main_metric": self.resolved_main_metric(),
            "max_length": self.max_length,  # the pipeline truncates as training did
            **({"range": list(self.range)} if self.range is not None else {}),  # decode clips
            **({"input_columns": self.input_columns()} if self.input_columns() else {}),
        }

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
    return list(schema.model_fields)


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
    if named and named[1].split(".")[0] in {*TaskCard.model_fields, *LocalSource.model_fields}:
        field = named[1] if field == "(card)" else f"{field}.{named[1]}"
        message = named[2]
    return field, message
