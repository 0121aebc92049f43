"""The model card of a pushed model: YAML metadata (library, tags, datasets, a model-index of
every task's dev metrics) as data, and the prose from a Jinja template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    HFValidationError,
)
from huggingface_hub.utils import validate_repo_id

from mtnlp.artifacts.report import DEV_PLOT, LOSS_PLOT, SHARE_PLOT
from mtnlp.artifacts.run_folder import (
    EVAL_RESULTS,
    FINETUNED_DIR,
    RESULTS_JSON,
    SUMMARY,
    read_cards,
)
from mtnlp.cards.schema import TaskCard
from mtnlp.metrics import evaluate_id, result_evaluate_id
from mtnlp.modeling.config import MultiTaskConfig, is_auxiliary, main_tasks
from mtnlp.modeling.loading import read_config
from mtnlp.modeling.model import MODEL_CARD
from mtnlp.utils.errors import UserError
from mtnlp.utils.files import read_json, write_file

LIBRARY_NAME = "mtnlp"

# the card's prose (Jinja, `ModelCard.from_template`): package data, see pyproject.toml
TEMPLATE = Path(__file__).with_name("model_card_template.md")


HUB_TASK_TYPES = {
    "classification": "text-classification",
    "regression": "text-classification",  # the Hub has no regression task type
    "tagging": "token-classification",
}
# in the model-index, a regression task on sentence pairs scores their similarity (STS-B)
PAIR_REGRESSION_TYPE = "sentence-similarity"
# Hub license ids (apache-2.0, mit, cc-by-4.0, other, ...) and languages (ISO 639 codes, with a
# BCP 47 region or script, or "multilingual")
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
LANGUAGE_CODE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*|multilingual")


def check_license(value: str | None, source: str) -> None:
    """A `UserError` naming `source` (the flag) unless `value` looks like a Hub license id."""
    if value is not None and not LICENSE_ID.fullmatch(value):
        raise UserError(
            f"{source}: expected a Hub license id such as apache-2.0, mit, cc-by-4.0 or other, "
            f"got {value!r}"
        )


def check_languages(values: Sequence[str] | None, source: str) -> None:
    """A `UserError` naming `source` unless every value is a language code (en, de, pt-BR,
    multilingual)."""
    for value in values or []:
        if not LANGUAGE_CODE.fullmatch(value):
            raise UserError(
                f"{source}: expected ISO 639 language codes such as en, de or pt-BR (or "
                f"multilingual), got {value!r}"
            )


def task_type(task: dict[str, Any]) -> str:
    """A task's type in the model-index (`task.type`): the Hub's name of the kind of task."""
    if task["type"] == "regression" and len(task["inputs"]) == 2:
        return PAIR_REGRESSION_TYPE
    return HUB_TASK_TYPES.get(task["type"], task["type"])


def pipeline_tag(tasks: Sequence[dict[str, Any]]) -> str | None:
    """The model's Hub pipeline tag: its tasks' common kind (text-classification: every task
    classifies or scores its input; token-classification: every task tags words); None for a
    model of both kinds, which no single Hub pipeline serves."""
    tags = {HUB_TASK_TYPES.get(task["type"]) for task in tasks}
    return tags.pop() if len(tags) == 1 else None


# the training report's figures, shown on the card when the run has them
PLOTS = {"training loss": LOSS_PLOT, "dev metrics": DEV_PLOT, "share of steps": SHARE_PLOT}


def _hub_base_model(name: str | None) -> str | None:
    """The `--model` a run started from, if it names a Hub model (not 'tiny', not a folder)."""
    if not name or name == "tiny" or Path(name).exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:  # a path (absolute, ./, ~/) of a folder that is not here
        return None
    return name


HF_CACHE_FOLDER = re.compile(r"models--(.+)")  # the Hub cache's folder of a repository


def encoder_metadata(name: str) -> dict[str, Any]:
    """What a run's card takes from its encoder's: `base_model` (the Hub model it came from:
    `--model` itself, the `base_model` of a local folder's model card, e.g. an mtnlp run's, or
    the repository of a Hub cache snapshot), and the `license` and `language` of the encoder's
    card when one is at hand (a local folder's README.md, or the Hub card in the local cache;
    nothing is downloaded). Empty for 'tiny'."""
    if name == "tiny":
        return {}
    folder = Path(name).expanduser()
    if folder.is_dir():
        readme = folder / MODEL_CARD
        cached = [HF_CACHE_FOLDER.fullmatch(p.name) for p in folder.resolve().parents]
        base = next((match[1].replace("--", "/") for match in cached if match), None)
    else:
        base = _hub_base_model(name)
        found = try_to_load_from_cache(base, MODEL_CARD) if base else None
        readme = Path(found) if isinstance(found, str) else None
    try:
        data = ModelCard.load(readme).data.to_dict() if readme and readme.is_file() else {}
    except (OSError, ValueError, yaml.YAMLError):  # an unreadable card gives nothing
        data = {}
    language = data.get("language")
    return {
        "base_model": data.get("base_model") or base,
        "license": data.get("license"),
        "language": [language] if isinstance(language, str) else language,
    }


def _local_name(name: str) -> str:
    """A name as the card shows it: an absolute or home path by its last part only, so the card
    never shows the folders of the machine it was made on."""
    return Path(name).name if Path(name).is_absolute() or name.startswith("~") else name


def _metric_split(key: str, card: TaskCard | None) -> tuple[str, str]:
    """`accuracy` -> (accuracy, first dev split); `accuracy_<split>` -> (accuracy, split)."""
    splits = card.eval_splits if card is not None else ["validation"]
    for split in splits[1:]:
        if key.endswith(f"_{split}"):
            return key.removesuffix(f"_{split}"), split
    return key, splits[0]


def _dataset(task: str, card: TaskCard | None) -> tuple[str, str, str | None]:
    """(dataset type, name, config) of a task: its Hub dataset, else the task name."""
    hub = card.source.hub if card is not None else None
    if hub is None:
        return task, task, None
    return hub.path, f"{hub.path} {hub.name}" if hub.name else hub.path, hub.name


def card_metadata(
    config: MultiTaskConfig,
    model_name: str,
    cards: dict[str, TaskCard],
    results: dict[str, dict[str, float]],
    base_model: str | None,
    license: str | None = None,
    language: Sequence[str] | None = None,
) -> ModelCardData:
    """The card's YAML metadata, with a model-index entry per task and dev metric. Metrics go by
    evaluate's ids (`pearsonr`, `seqeval`), each result by the name mtnlp reports it under."""
    evals = []
    for task in main_tasks(config.tasks or []):  # an auxiliary task's results are no claim
        name, card = task["name"], cards.get(task["name"])
        dataset_type, dataset_name, dataset_config = _dataset(name, card)
        for key, value in results.get(name, {}).items():
            metric, split = _metric_split(key, card)
            evals.append(
                EvalResult(
                    task_type=task_type(task),
                    task_name=name,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=dataset_config,
                    dataset_split=split,
                    metric_type=result_evaluate_id(metric),
                    metric_name=key,
                    metric_value=value,
                )
            )
    tasks = main_tasks(config.tasks or [])
    types = sorted({task_type(t) for t in tasks})
    datasets = sorted({c.source.hub.path for c in cards.values() if c.source.hub is not None})
    metrics = {evaluate_id(name) for t in tasks for name in t.get("metrics") or []} - {None}
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag(tasks),
        tags=[LIBRARY_NAME, "multi-task", "mt-dnn", *types],
        license=license,
        language=list(language) if language else None,
        base_model=_hub_base_model(base_model),
        datasets=datasets or None,
        metrics=sorted(metrics) or None,
        model_name=model_name,
        eval_results=evals or None,
    )


def _metric(value: Any) -> str:
    """A dev metric as the card shows it: floats to 4 decimals."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _cell(value: Any) -> str:
    """A table cell: one line, with no `|` that would end the cell."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _encoder_origin(base_model: str | None) -> tuple[str, str]:
    """Where the encoder came from: (kind, name) with kind '', 'tiny', 'local' or 'hub'."""
    if not base_model:
        return "", ""
    if base_model == "tiny":
        return "tiny", base_model
    if _hub_base_model(base_model) is None:
        return "local", Path(base_model).name
    return "hub", base_model


def _usage_values(config: MultiTaskConfig) -> dict[str, Any]:
    """The usage snippet's input and tasks: the main tasks reading the same kind of input as the
    first."""
    tasks = main_tasks(config.tasks or [])
    pair = bool(tasks) and len(tasks[0]["inputs"]) == 2
    text = (
        '{"text": "A man is playing a guitar.", "text_pair": "Someone plays music."}'
        if pair
        else '{"text": "The film was a delight from start to finish."}'
    )
    return {
        "json_input": text,
        "python_input": text if pair else '"The film was a delight from start to finish."',
        "usage_tasks": [t["name"] for t in tasks if (len(t["inputs"]) == 2) == pair],
    }


def _task_rows(
    config: MultiTaskConfig, cards: dict[str, TaskCard], results: dict[str, dict[str, float]]
) -> list[list[str]]:
    """Per task: name, type (auxiliary tasks marked: their heads are in the model, but the
    pipeline runs them only when named), description, labels, metrics, dev results."""
    rows = [
        [
            task["name"],
            task["type"] + (" (auxiliary)" if is_auxiliary(task) else ""),
            cards[task["name"]].description if task["name"] in cards else "",
            ", ".join(task.get("labels") or []) or "(a real value)",
            ", ".join(_local_name(metric) for metric in task.get("metrics") or []),  # scripts
            ", ".join(f"{k} {_metric(v)}" for k, v in results.get(task["name"], {}).items()),
        ]
        for task in config.tasks or []
    ]
    return [[_cell(cell) for cell in row] for row in rows]


def _training_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The training set-up a run summary records, as (setting, value), without unknowns."""
    args = summary.get("args", {})
    task_steps = ", ".join(f"{t}: {n}" for t, n in summary.get("task_steps", {}).items())
    settings = [
        ("task sampler", args.get("sampler")),
        ("loss weighting", args.get("weighting")),
        ("optimizer steps", summary.get("steps")),
        ("mixed precision", summary.get("mixed_precision")),
        ("processes", summary.get("num_processes")),
        ("batch size per process", args.get("batch_size")),
        ("gradient accumulation", args.get("gradient_accumulation_steps")),
        ("learning rate", args.get("learning_rate")),
        ("steps per task", task_steps),
    ]
    return [(label, _cell(value)) for label, value in settings if value not in (None, "")]


def model_card(
    config: MultiTaskConfig,
    repo_id: str,
    run_dir: Path | None = None,
    onnx_files: Sequence[str] = (),
    license: str | None = None,
    language: Sequence[str] | None = None,
) -> str:
    """README.md of the pushed model: metadata, tasks, dev results, training set-up, usage.

    `run_dir` is the training output folder: its `cards/`, `eval_results.json`,
    `train_summary.json` and report plots fill in what the model config alone does not know;
    `onnx_files` are the ONNX graphs pushed with the model (`mtnlp export`), which the card says
    how to run. `license` and `language` replace the run's (its flags, or its encoder's card).
    The values are computed here; the prose is `model_card_template.md` (Jinja).
    """
    cards = read_cards(run_dir)
    results = read_json(run_dir / EVAL_RESULTS) if run_dir else {}
    summary = read_json(run_dir / SUMMARY) if run_dir else {}
    args = summary.get("args", {})
    base = args.get("model")
    name = repo_id.split("/")[-1]
    origin, source = _encoder_origin(base)
    card = ModelCard.from_template(
        card_metadata(
            config,
            name,
            cards,
            results,
            args.get("base_model") or base,  # the Hub model a local encoder came from
            license=license or args.get("license"),
            language=language or args.get("language"),
        ),
        template_path=str(TEMPLATE),
        title=name,
        repo_id=repo_id,
        encoder=config.encoder.model_type,
        encoder_origin=origin,
        encoder_source=source,
        task_rows=_task_rows(config, cards, results),
        training_rows=_training_rows(summary),
        finetuned_dir=FINETUNED_DIR,
        finetuned_rows=_finetuned_rows(read_json(run_dir / RESULTS_JSON) if run_dir else {}),
        plots=[
            (title, path) for title, path in PLOTS.items() if run_dir and (run_dir / path).is_file()
        ],
        onnx_files=list(onnx_files),
        **_usage_values(config),
    )
    # parse the metadata back (a malformed card fails here); Jinja drops the last newline
    return ModelCard(card.content.rstrip("\n") + "\n").content


def _finetuned_rows(table: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    """One row per task and dev metric of MT-DNN's second stage (`finetune_results.json`)."""
    rows = []
    for task, stages in table.items():
        stage_names = list(stages)  # multi-task, multi-task + fine-tune
        for metric, before in stages[stage_names[0]].items():
            after = stages[stage_names[-1]].get(metric)
            folder = f"`{FINETUNED_DIR}/{task}`"
            rows.append([task, folder, metric, _metric(before), _metric(after)])
    return rows


def write_model_card(folder: Path, repo_id: str | None = None) -> Path:
    """Write the model card, README.md, into a finished run folder and return its path.

    The card reads the folder's config.json, `cards/`, `eval_results.json`,
    `train_summary.json` and plots; `repo_id` is the name its usage snippet loads (default: the
    folder's name). `MultiTaskModel.from_pretrained(folder)` keeps the card, so a later
    `model.push_to_hub(repo)` uploads it.
    """
    folder = Path(folder)
    content = model_card(read_config(folder), repo_id or folder.resolve().name, folder)
    # a reader sees the old card or the new one, never half of it; a link there is replaced
    return write_file(folder / MODEL_CARD, content)
