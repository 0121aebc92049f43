"""Push a trained multi-task model to the Hugging Face Hub with a model card.

One commit holds everything needed to use the model elsewhere: the encoder and every head
(`model.safetensors`, `config.json`), the tokenizer, the task cards (`cards/`), the label maps
(`label_maps.json`), the dev metrics and training summary, the training report, and a model card
(`README.md`) whose YAML metadata (`library_name: mtnlp`, tags, base model, datasets and a
`model-index` of each task's dev metrics) the Hub indexes. Only the main process pushes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import httpx, validate_repo_id
from transformers import PreTrainedTokenizerBase

from mtnlp.cards import TaskCard, load_cards
from mtnlp.errors import UserError, first_line
from mtnlp.modeling import MultiTaskConfig, MultiTaskModel, check_weight_files
from mtnlp.report import DEV_PLOT, LOSS_PLOT, SHARE_PLOT

LIBRARY_NAME = "mtnlp"
LABEL_MAPS = "label_maps.json"
PUSHED_FOLDERS = ("cards", "plots")  # not checkpoints, fine-tuned runs or tracker logs
PICKLES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")  # never pushed: unpickling runs code
HUB_TASK_TYPES = {
    "classification": "text-classification",
    "regression": "text-classification",  # the Hub has no regression task type
    "tagging": "token-classification",
}
# the training report's figures, shown on the card when the run has them
PLOTS = {"training loss": LOSS_PLOT, "dev metrics": DEV_PLOT, "share of steps": SHARE_PLOT}


def check_repo_id(repo_id: str | None) -> str:
    """`repo_id` if the Hub accepts it as a model id (`name` or `namespace/name`)."""
    if not repo_id:
        raise UserError("--hub-model-id: required to push (e.g. your-name/glue-mt)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(
            f"--hub-model-id: {repo_id!r} is not a valid Hub model id ({error})"
        ) from None
    return repo_id


# ------------------------------------------------------------------------------ what a run holds
def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_cards(folder: Path | None) -> dict[str, TaskCard]:
    """The run's task cards by name (`cards/` written by `training.save_run`), if any."""
    if folder is None or not (folder / "cards").is_dir():
        return {}
    return {card.name: card for card in load_cards([folder / "cards"])}


def label_maps(config: MultiTaskConfig) -> dict[str, dict[str, dict]]:
    """Per task with label names: `id2label` and `label2id`, for readers that do not use mtnlp."""
    return {
        task["name"]: {
            "id2label": dict(enumerate(task["labels"])),
            "label2id": {label: i for i, label in enumerate(task["labels"])},
        }
        for task in config.tasks or []
        if task.get("labels")
    }


def artifact_files(folder: Path) -> dict[str, Path]:
    """Path in the repo -> file: the folder's top-level files and its cards/ and plots/."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and path.suffix not in PICKLES:
            files[path.name] = path
        elif path.name in PUSHED_FOLDERS:
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                files[file.relative_to(folder).as_posix()] = file
    return files


# ------------------------------------------------------------------------------ the model card
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


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _origin(base_model: str | None) -> str:
    """Where the encoder came from, in words."""
    if not base_model:
        return ""
    if base_model == "tiny":
        return " (a tiny random encoder, `--model tiny`: a smoke run)"
    if _hub_base_model(base_model) is None:
        return f" (from a local encoder folder, `{Path(base_model).name}`)"
    return f" (from `{base_model}`)"


def _usage(config: MultiTaskConfig, repo_id: str) -> str:
    """A snippet running the tasks that read the same kind of input as the first task."""
    tasks = config.tasks or []
    pair = bool(tasks) and len(tasks[0]["inputs"]) == 2
    names = [t["name"] for t in tasks if (len(t["inputs"]) == 2) == pair]
    text = (
        '{"text": "A man is playing a guitar.", "text_pair": "Someone plays music."}'
        if pair
        else '{"text": "The film was a delight from start to finish."}'
    )
    python_input = text if pair else '"The film was a delight from start to finish."'
    return f"""```python
import mtnlp  # registers the model with transformers' Auto classes
from transformers import AutoTokenizer

model = mtnlp.MultiTaskModel.from_pretrained("{repo_id}")  # or transformers.AutoModel
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
predict = mtnlp.MultiTaskPipeline(model, tokenizer)
print(predict({python_input}, tasks={names!r}))
```

```bash
echo '{text}' | mtnlp predict {repo_id} --tasks {",".join(names)}
```"""


def model_card(config: MultiTaskConfig, repo_id: str, run_dir: Path | None = None) -> str:
    """README.md of the pushed model: metadata, tasks, dev metrics, training set-up, usage.

    `run_dir` is the training output folder: its `cards/`, `eval_results.json`,
    `train_summary.json` and report plots fill in what the model config alone does not know.
    """
    cards = read_cards(run_dir)
    results = read_json(run_dir / "eval_results.json") if run_dir else {}
    summary = read_json(run_dir / "train_summary.json") if run_dir else {}
    args = summary.get("args", {})
    base = args.get("model")
    metadata = card_metadata(config, repo_id.split("/")[-1], cards, results, base)
    encoder = config.encoder.model_type
    tasks_rows = [
        [
            task["name"],
            task["type"],
            cards[task["name"]].description if task["name"] in cards else "",
            ", ".join(task.get("labels") or []) or "(a real value)",
            ", ".join(_local_name(metric) for metric in task.get("metrics") or []),  # scripts
            ", ".join(f"{k} {_format(v)}" for k, v in results.get(task["name"], {}).items()),
        ]
        for task in config.tasks or []
    ]
    training_rows = [
        [label, value]
        for label, value in [
            ("task sampler", args.get("sampler")),
            ("loss weighting", args.get("weighting")),
            ("optimizer steps", summary.get("steps")),
            ("mixed precision", summary.get("mixed_precision")),
            ("processes", summary.get("num_processes")),
            ("batch size per process", args.get("batch_size")),
            ("gradient accumulation", args.get("gradient_accumulation_steps")),
            ("learning rate", args.get("learning_rate")),
            (
                "steps per task",
                ", ".join(f"{t}: {n}" for t, n in summary.get("task_steps", {}).items()),
            ),
        ]
        if value not in (None, "")
    ]
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"A multi-task model trained with mtnlp in the style of "
        f"MT-DNN (Liu et al. 2019): one shared {encoder} encoder"
        + _origin(base)
        + f" and one head per task, {len(tasks_rows)} task(s) in one model.",
        "## Tasks and dev results",
        _table(["task", "type", "description", "labels", "metrics", "dev results"], tasks_rows),
    ]
    if training_rows:
        sections += ["## Training", _table(["setting", "value"], training_rows)]
    plots = [
        f"![{title}]({path})"
        for title, path in PLOTS.items()
        if run_dir and (run_dir / path).is_file()
    ]
    if plots:
        sections += ["## Training curves", "\n".join(plots)]
    sections += [
        "## Usage",
        _usage(config, repo_id),
        "## Files",
        "`model.safetensors` and `config.json` (encoder and every head; the task metadata lives in "
        "the config), the tokenizer, `cards/` (the task cards), `label_maps.json`, "
        "`eval_results.json` and `train_summary.json`. Loading runs no code from the repository.",
    ]
    content = f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content).content  # parses the metadata back: a malformed card fails here


# ------------------------------------------------------------------------------ pushing
def read_config(folder: Path) -> MultiTaskConfig:
    """The config of an mtnlp model folder; a `UserError` for any other folder."""
    config = read_json(folder / "config.json")
    if config.get("model_type") != MultiTaskConfig.model_type:
        raise UserError(
            f"{folder}: not an mtnlp model folder (no config.json of model_type 'mtnlp')"
        )
    return MultiTaskConfig.from_pretrained(folder)


def push_to_hub(
    model: MultiTaskModel | str | Path,
    repo_id: str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    run_dir: str | Path | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload mtnlp multi-task model",
) -> CommitInfo | None:
    """Push a model folder (`model` as a path, e.g. a training `--output-dir`), or a model object
    with its `tokenizer` and the `run_dir` whose cards, metrics and report to include, in one
    commit with a generated model card. Returns the commit; None on processes other than the main
    one, which push nothing."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return None
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory() as staging:
        if isinstance(model, (str, Path)):
            folder = run_dir = Path(model)
            config = read_config(folder)
            check_weight_files(folder)  # safetensors, whole: never a pickle-only model
        else:
            folder, config = Path(staging), model.config
            model.save_pretrained(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        run_dir = Path(run_dir) if run_dir is not None else None
        files = {**(artifact_files(run_dir) if run_dir else {}), **artifact_files(folder)}
        api = HfApi(library_name=LIBRARY_NAME)
        try:
            # the full id (a bare name gets the user's namespace) is the one the card shows
            repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
            generated = {
                "README.md": model_card(config, repo_id, run_dir),
                LABEL_MAPS: json.dumps(label_maps(config), indent=2) + "\n",
            }
            operations = [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(file))
                for path, file in files.items()
                if path not in generated
            ] + [
                CommitOperationAdd(path_in_repo=path, path_or_fileobj=text.encode("utf-8"))
                for path, text in generated.items()
            ]
            return api.create_commit(
                repo_id, operations, commit_message=commit_message, token=token
            )
        except (ConnectionError, httpx.TransportError) as error:  # offline, or no network
            reason = (
                "offline mode: HF_HUB_OFFLINE is set"
                if isinstance(error, OfflineModeIsEnabled)
                else first_line(error)
            )
            raise UserError(
                f"push to {repo_id}: cannot reach the Hugging Face Hub ({reason})"
            ) from None
        except (HfHubHTTPError, LocalTokenNotFoundError) as error:
            raise UserError(f"push to {repo_id}: {first_line(error)}") from None
