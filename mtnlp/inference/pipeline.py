"""`MultiTaskPipeline`: predictions of several tasks on raw text, one encoder pass per batch.

MT-DNN (Liu et al. 2019) shares one encoder between every task: the encoder is the cost and the
heads are cheap. So the pipeline groups the requested tasks by the input they read (a single
text or a text pair) and runs the encoder once per batch for the whole group. Tagging tasks read
whitespace-split words (as in training). Each task reads its input as training tokenized it:
truncated to the `max_length` of its card (stored in the model config). Tasks share a pass
whenever their tokenizations give the same token ids: tagging and sentence tasks do with WordPiece
tokenizers, and tasks with different `max_length`s do for a batch that neither truncates.

`MultiTaskPipeline.from_onnx(folder)` runs the same steps on the ONNX graph of `mtnlp export`
(ONNX Runtime, CPU; `inference/onnx.py`): same inputs, same results.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE, OnnxModel, load_onnx
from mtnlp.modeling.heads import HEADS
from mtnlp.modeling.model import MultiTaskModel, eval_mode
from mtnlp.utils.errors import UserError

Input = str | tuple[str, str] | dict[str, str]

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
IOB_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")  # entity tag prefixes (IOB, IOBES, BILOU)


@dataclass(frozen=True)
class Example:
    """One input: a text, optionally with its pair."""

    text: str
    text_pair: str | None = None
    # the words, where they are given as words (a data split's tokens, which may hold spaces):
    # never re-split; None: the text split on whitespace
    words: tuple[str, ...] | None = None


def as_example(value: Any, where: str) -> Example:
    """A text, a `(text, text_pair)` tuple or a `{"text": ..., "text_pair": ...}` mapping (or an
    `Example`, e.g. one holding a data split's words)."""
    if isinstance(value, Example):
        return value
    if isinstance(value, str):
        return Example(value)
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return Example(*value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"text", "text_pair"})
        text, pair = value.get("text"), value.get("text_pair")
        if not unknown and isinstance(text, str) and (pair is None or isinstance(pair, str)):
            return Example(text, pair)
    raise UserError(
        f"{where}: expected a text, a (text, text_pair) tuple or "
        f'{{"text": ..., "text_pair": ...}} with strings, got {value!r}'
    )


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(
    device: str | torch.device | None, model: MultiTaskModel | OnnxModel
) -> torch.device:
    """`device` (default: where the model is); a CUDA device on a machine without one is a
    `UserError`."""
    if device is None:
        return model.device
    try:
        device = torch.device(device)
    except RuntimeError:
        raise UserError(f"device: {device!r}; expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device: {device}: no CUDA device on this machine")
    return device


def is_iob(labels: Sequence[str]) -> bool:
    """Whether tags name entities (B-PER, I-PER, O, ...) rather than, e.g., parts of speech."""
    return any(label != "O" for label in labels) and all(
        label == "O" or label[:2] in IOB_PREFIXES for label in labels
    )


def entity_scheme(task: dict[str, Any]) -> type | None:
    """The seqeval scheme that the task's entity metric uses (`seqeval`: IOB2, `seqeval_iobes`:
    IOBES, ...), so that the entities shown are the ones the dev metric counts; IOB2 for IOB-like
    tags without such a metric; None for tags that name no entities."""
    from seqeval import scheme as schemes  # the light part of seqeval (no scikit-learn)

    metrics = [m for m in task.get("metrics") or [] if m.split("_")[0] == "seqeval"]
    if not metrics and not is_iob(task["labels"]):
        return None
    name = metrics[0].removeprefix("seqeval").lstrip("_").upper() if metrics else ""
    return getattr(schemes, name or "IOB2")


def group_entities(
    words: list[str], tags: list[str | None], scores: list[float | None], scheme: type
) -> list[dict]:
    """Entity spans (seqeval's strict mode): type, text, word start and end (exclusive) and the
    mean score of its words. Words without a tag (cut off by truncation) count as O."""
    from seqeval.scheme import Tokens

    entities = []
    for entity in Tokens([tag or "O" for tag in tags], scheme=scheme).entities:
        span = scores[entity.start : entity.end]
        entities.append(
            {
                "type": entity.tag,
                "text": " ".join(words[entity.start : entity.end]),
                "start": entity.start,
                "end": entity.end,
                "score": sum(span) / len(span),
            }
        )
    return entities


class MultiTaskPipeline:
    """Raw texts (or text pairs) in, every requested task's prediction out.

    `pipeline(inputs, tasks=None)` returns, per input, task -> result: classification
    `{"label", "score"}`, regression `{"value"}`, tagging `{"words", "tags", "scores"}` (one tag
    per whitespace-split word, read at its first sub-token; None for words cut off by
    `max_length`) plus `"entities"` when the tags name entities. One input gives one dict, a list
    gives a list. `tasks=None` runs every main task that reads the input's kind (a text or a
    pair): auxiliary tasks (`role: auxiliary`) keep their heads in the model but run only when
    named; a named task that does not fit an input raises a `UserError`.

    Each task truncates its input at the `max_length` it was trained with (its card's); models
    saved before mtnlp stored it, and every task when `max_length` is given here, truncate at
    that length or else the encoder's maximum.

    The pipeline runs the model in eval mode without changing the caller's model: a `dtype`
    other than the model's converts a copy (`self.model`; the model given stays as it was, so
    converting in place first, `model.to(dtype=...)`, saves that copy's memory). `device` moves
    the model itself, as transformers' pipelines do. `from_onnx` builds the pipeline on an ONNX
    graph instead (`self.model` is then an `OnnxModel`).
    """

    def __init__(
        self,
        model: MultiTaskModel | OnnxModel,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
    ) -> None:
        if batch_size <= 0:
            raise UserError("batch_size: must be positive")
        self.device = resolve_device(device, model)
        if isinstance(model, OnnxModel) and (dtype is not None or self.device.type != "cpu"):
            raise UserError(
                f"dtype, device: {model.path} runs on the CPU in the precision it was exported "
                f"in (int8: the {INT8_FILE} of `mtnlp export --quantize int8`)"
            )
        dtype = resolve_dtype(dtype)
        if dtype is not None and dtype != model.dtype:
            model = copy.deepcopy(model).to(dtype=dtype)  # the caller's model stays as it was
        self.model = model.to(device=self.device)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        positions = getattr(model.config.encoder, "max_position_embeddings", 512)
        self.longest = min(tokenizer.model_max_length, positions)  # what the encoder can read
        self.max_length = max_length

    @classmethod
    def from_onnx(
        cls,
        folder: str | Path,
        *,
        file: str = ONNX_FILE,
        batch_size: int = 32,
        max_length: int | None = None,
        threads: int | None = None,
    ) -> MultiTaskPipeline:
        """The pipeline on the ONNX graph `file` (`model.onnx`, or `model.int8.onnx`) of an
        `mtnlp export` folder, or of a model folder or Hub id that holds one: ONNX Runtime on the
        CPU with `threads` intra-op threads (default: one per core), no PyTorch weights. Needs
        `pip install 'mtnlp[onnx]'`."""
        model, tokenizer = load_onnx(folder, file, threads)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length)

    @property
    def tasks(self) -> list[str]:
        return self.model.config.task_names

    def max_length_of(self, task: str) -> int:
        """Tokens `task` reads: the pipeline's `max_length`, else the task's own (its card's),
        else (models saved without it) the encoder's maximum; never more than the encoder's."""
        own = self.model.config.task(task).get("max_length")
        return min(self.max_length or own or self.longest, self.longest)

    def __call__(
        self,
        inputs: Input | Sequence[Input],
        tasks: Sequence[str] | None = None,
        *,
        numbers: Sequence[int] | None = None,
    ) -> dict[str, dict] | list[dict[str, dict]]:
        """Predictions of `tasks` (default: all that fit) for one input or a list of inputs;
        error messages call the inputs `input <number>`, numbered 1, 2, ... or by `numbers`
        (the CLI passes line numbers)."""
        single = isinstance(inputs, (str, tuple, dict))
        values = [inputs] if single else list(inputs)
        numbers = range(1, len(values) + 1) if numbers is None else numbers
        examples = [
            as_example(value, f"input {number}")
            for number, value in zip(numbers, values, strict=True)
        ]
        requested = self.check_tasks(tasks)
        results: list[dict[str, dict]] = [{} for _ in examples]
        for pair in (False, True):  # tasks that read the same kind of input share the encoder
            indices = [i for i, e in enumerate(examples) if (e.text_pair is not None) == pair]
            if not indices:
                continue
            group = self._tasks_for(
                requested, pair, explicit=tasks is not None, number=numbers[indices[0]]
            )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, result in zip(
                    chunk, self.predict_batch([examples[i] for i in chunk], group), strict=True
                ):
                    results[index] = result
        return results[0] if single else results

    def check_tasks(self, tasks: Sequence[str] | None) -> list[str]:
        """`tasks` (default: every main task of the model; an auxiliary task only when named),
        checked: a `UserError` for an unknown task or a tagging task of text pairs."""
        names = self.model.config.main_task_names if tasks is None else list(tasks)
        unknown = [name for name in names if name not in self.tasks]
        if unknown:
            raise UserError(
                f"tasks: no task {', '.join(unknown)} in this model; tasks: {', '.join(self.tasks)}"
            )
        for name in names:
            spec = self.model.config.task(name)
            if HEADS.get(spec["type"]).token_level and len(spec["inputs"]) > 1:
                raise UserError(f"task {name}: the pipeline tags single texts, not text pairs")
        return names

    def _tasks_for(
        self, requested: list[str], pair: bool, explicit: bool, number: int
    ) -> list[str]:
        """The requested tasks that read a pair (or a single text); a named misfit is an error."""
        fits = [
            name for name in requested if (len(self.model.config.task(name)["inputs"]) == 2) == pair
        ]
        misfits = [name for name in requested if name not in fits]
        if explicit and misfits:
            reads = "a single text" if pair else "a text pair (text and text_pair)"
            has = "has a text_pair" if pair else "has no text_pair"
            raise UserError(f"input {number} {has}, but task {misfits[0]} reads {reads}")
        if not fits:
            kind = "text pairs" if pair else "single texts"
            tasks = ", ".join(self.tasks)
            raise UserError(f"input {number}: no task of this model reads {kind}; tasks: {tasks}")
        return fits

    # ------------------------------------------------------------------------ one batch
    def _tokenization(self, task: str) -> tuple[bool, int]:
        """How `task` reads its input, as in training: (split into words, max_length)."""
        spec = self.model.config.task(task)
        return HEADS.get(spec["type"]).token_level, self.max_length_of(task)

    def _tokenize(self, examples: list[Example], words: list[list[str]], how: tuple[bool, int]):
        by_words, max_length = how
        pairs = [e.text_pair for e in examples] if examples[0].text_pair is not None else None
        return self.tokenizer(
            words if by_words else [e.text for e in examples],
            None if by_words else pairs,
            truncation=True,
            max_length=max_length,
            padding=True,
            is_split_into_words=by_words,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def predict_batch(self, examples: list[Example], tasks: list[str]) -> list[dict[str, dict]]:
        """Results of `tasks` on examples of one kind. Each task's input is tokenized as in
        training (`_tokenization`); one encoder pass serves every task whose tokens are the same."""
        with eval_mode(self.model):
            return self._predict_batch(examples, tasks)

    def _predict_batch(self, examples: list[Example], tasks: list[str]) -> list[dict[str, dict]]:
        how = {task: self._tokenization(task) for task in tasks}
        words = [
            list(example.words) if example.words is not None else example.text.split()
            for example in examples
        ]
        encodings = {
            key: self._tokenize(examples, words, key) for key in dict.fromkeys(how.values())
        }
        runs: dict[tuple[bool, int], list[str]] = {}  # the encoding that runs -> its tasks
        for key, encoding in encodings.items():
            ids = encoding["input_ids"]
            run = next((r for r in runs if torch.equal(encodings[r]["input_ids"], ids)), key)
            runs.setdefault(run, []).extend(task for task in tasks if how[task] == key)
        results: list[dict[str, dict]] = [{} for _ in examples]
        for key, group in runs.items():
            outputs = self.model.forward_tasks(group, **encodings[key].to(self.device))
            for task in group:  # a tagging task reads word ids of its own (words) tokenization
                encoding = encodings[how[task]]
                decoded = self._decode(task, outputs[task].logits, encoding, words)
                for result, value in zip(results, decoded, strict=True):
                    result[task] = value
        return [{task: result[task] for task in tasks} for result in results]

    def _decode(
        self, task: str, logits: torch.Tensor, encoding, words: list[list[str]]
    ) -> list[dict]:
        spec = self.model.config.task(task)
        head = HEADS.get(spec["type"])
        predicted = self.model.heads[task].decode(logits)  # class ids, values or tag ids
        if not head.needs_labels:
            return [{"value": value} for value in predicted.float().tolist()]
        # probability of the predicted label: (batch,) or (batch, tokens)
        scores = logits.float().softmax(-1).gather(-1, predicted.unsqueeze(-1)).squeeze(-1)
        if not head.token_level:
            return [
                {"label": spec["labels"][label], "score": score}
                for label, score in zip(predicted.tolist(), scores.tolist(), strict=True)
            ]
        return [
            word_tags(spec, sentence, encoding.word_ids(i), ids, row)
            for i, (sentence, ids, row) in enumerate(
                zip(words, predicted.tolist(), scores.tolist(), strict=True)
            )
        ]


def word_tags(
    task: dict[str, Any], words: list[str], word_ids: list, ids: list[int], scores: list[float]
) -> dict[str, Any]:
    """Per-token predictions -> one tag and score per word (at its first sub-token, as training
    labels it), plus the entities they form."""
    from mtnlp.data.words import word_predictions

    per_word = word_predictions(word_ids, list(zip(ids, scores, strict=True)), len(words))
    tags = [None if value is None else task["labels"][value[0]] for value in per_word]
    word_scores = [None if value is None else value[1] for value in per_word]
    result: dict[str, Any] = {"words": words, "tags": tags, "scores": word_scores}
    scheme = entity_scheme(task)
    if scheme is not None:
        result["entities"] = group_entities(words, tags, word_scores, scheme)
    return result
