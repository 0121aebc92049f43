"""The model card of a pushed model: YAML metadata (library, tags, datasets, a model-index of
every task's dev metrics) as data, and the prose from a Jinja template.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import (
    EvalResult,
    ModelCard,
    ModelCardData,
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
from mtnlp.modeling.config import MultiTaskConfig
from mtnlp.modeling.loading import read_config
from mtnlp.modeling.model import MODEL_CARD
from mtnlp.utils.files import read_json

LIBRARY_NAME = "mtnlp"

# the card's prose (Jinja, `ModelCard.from_template`): package data, see pyproject.toml
TEMPLATE = Path(__file__).with_name("model_card_template.md")


HUB_TASK_TYPES = {
    "classification": "text-classification",
    "regression": "text-classification",  # the Hub has no regression task type
    "tagging": "token-classification",
}


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
) -> ModelCardData:
    """The card's YAML metadata, with a model-index entry per task and dev metric."""
    evals = []
    for task in config.tasks or []:
        name, card = task["name"], cards.get(task["name"])
        dataset_type, dataset_name, dataset_config = _dataset(name, card)
        for key, value in results.get(name, {}).items():
            metric, split = _metric_split(key, card)
            evals.append(
                EvalResult(
                    task_type=HUB_TASK_TYPES.get(task["type"], task["type"]),
                    task_name=name,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_config=dataset_config,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=key,
                    metric_value=value,
                )
            )
    types = sorted({HUB_TASK_TYPES.get(t["type"], t["type"]) for t in config.tasks or []})
    datasets = sorted({c.source.hub.path for c in cards.values() if c.source.hub is not None})
    return ModelCardData(
        library_name=LIBRARY_NAME,
        tags=[LIBRARY_NAME, "multi-task", "mt-dnn", *types],
        base_model=_hub_base_model(base_model),
        datasets=datasets or None,
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
    """The usage snippet's input and tasks: those reading the same kind of input as the first."""
    tasks = config.tasks or []
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
    """Per task: name, type, description, labels, metrics, dev results."""
    rows = [
        [
            task["name"],
            task["type"],
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


def model_card(config: MultiTaskConfig, repo_id: str, run_dir: Path | None = None) -> str:
    """README.md of the pushed model: metadata, tasks, dev results, training set-up, usage.

    `run_dir` is the training output folder: its `cards/`, `eval_results.json`,
    `train_summary.json` and report plots fill in what the model config alone does not know. The
    values are computed here; the prose is `model_card_template.md` (Jinja).
    """
    cards = read_cards(run_dir)
    results = read_json(run_dir / EVAL_RESULTS) if run_dir else {}
    summary = read_json(run_dir / SUMMARY) if run_dir else {}
    base = summary.get("args", {}).get("model")
    name = repo_id.split("/")[-1]
    origin, source = _encoder_origin(base)
    card = ModelCard.from_template(
        card_metadata(config, name, cards, results, base),
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
    path = folder / MODEL_CARD
    staging = folder / f".{MODEL_CARD}.tmp"
    staging.write_text(content, encoding="utf-8")
    staging.replace(path)  # a reader sees the old card or the new one, never half of it
    return path
