"""K tasks on the same sentences: mtnlp's one-pass prediction against K single-task models.

    python -m bench.inference                 # MiniLM, SST-2 dev sentences, K = 1, 2, 4, 8
    python -m bench.inference --quick         # tiny random BERT, a smoke run (< 1 min)

mtnlp: one `MultiTaskModel` with K classification heads on one encoder, called through
`MultiTaskPipeline(sentences, tasks=...)`: one tokenization and one encoder pass per batch for
all K tasks, then label and score per task. Separate: K `AutoModelForSequenceClassification`
models on the same encoder weights, each tokenizing the batch, encoding it and turning its
logits into label and score (what K pipelines do). Both in fp32 eval mode, the same batches.
`speedup[K]` is separate time / mtnlp time, median over rounds (target: at least 0.9 x K);
`speedup_forward[K]` times the models alone on batches tokenized once (the encoder-only view).
Rounds alternate which side runs first. Peak RSS is measured per side, each side built and run
alone at the largest K.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    DATA_DIR,
    GLUE_CARDS,
    PeakRSS,
    emit,
    encoder_folder,
    parser,
    setup,
    spread,
    temporary_folder,
)

TARGET = 0.9  # speed-up at least 0.9 x K


def sentences(data_dir: Path, count: int) -> list[str]:
    """The first `count` SST-2 dev sentences (read through mtnlp's own card and reader)."""
    from mtnlp import load_cards
    from mtnlp.data.read import load_raw

    card = load_cards([GLUE_CARDS], ["sst2"])[0]
    texts = load_raw(card, ["validation"], [data_dir])["validation"]["sentence"]
    return list(texts[:count])


def task_specs(k: int) -> list[dict[str, Any]]:
    """K two-class sentence tasks (SST-2's card under K names)."""
    from mtnlp import load_cards

    spec = load_cards([GLUE_CARDS], ["sst2"])[0].model_spec()
    return [{**spec, "name": f"task{i}"} for i in range(k)]


def build_mtnlp(model_folder: str, k: int, batch_size: int):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mtnlp.inference.pipeline import MultiTaskPipeline
    from mtnlp.modeling.model import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(AutoModel.from_pretrained(model_folder), task_specs(k))
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    return MultiTaskPipeline(model.eval(), tokenizer, batch_size=batch_size)


def build_separate(model_folder: str, k: int) -> list:
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return [
        AutoModelForSequenceClassification.from_pretrained(model_folder, num_labels=2).eval()
        for _ in range(k)
    ]


def run_separate(models: Sequence, tokenizer, texts: list[str], batch_size: int, max_length: int):
    """Each model: tokenize, encode, label and score, batch by batch (K single-task pipelines)."""
    import torch

    results = []
    with torch.inference_mode():
        for model in models:
            labels = model.config.id2label
            for start in range(0, len(texts), batch_size):
                encoding = tokenizer(
                    texts[start : start + batch_size],
                    truncation=True,
                    max_length=max_length,
                    padding=True,
                    return_tensors="pt",
                )
                scores, predicted = model(**encoding).logits.float().softmax(-1).max(-1)
                results.extend(
                    {"label": labels[label], "score": score}
                    for label, score in zip(predicted.tolist(), scores.tolist(), strict=True)
                )
    return results


def timed(function: Callable[[], Any]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def memory(model_folder: str, texts: list[str], k: int, batch_size: int) -> dict[str, Any]:
    """Peak RSS of each side built and run alone with `k` tasks, and its parameter size."""
    result = {}
    with PeakRSS() as peak:
        pipeline = build_mtnlp(model_folder, k, batch_size)
        pipeline(texts, tasks=pipeline.tasks)
    size = sum(p.numel() * p.element_size() for p in pipeline.model.parameters())
    result["mtnlp"] = {"peak_rss_mb_inference": peak.mb, "parameters_mb": size / 2**20}
    tokenizer, max_length = pipeline.tokenizer, pipeline.max_length_of(pipeline.tasks[0])
    del pipeline
    gc.collect()
    with PeakRSS() as peak:
        models = build_separate(model_folder, k)
        run_separate(models, tokenizer, texts, batch_size, max_length)
    size = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    result["separate"] = {"peak_rss_mb_inference": peak.mb, "parameters_mb": size / 2**20}
    result["scope"] = peak.scope
    del models
    gc.collect()
    return result


def measure(
    model_folder: str, texts: list[str], ks: Sequence[int], rounds: int, batch_size: int
) -> dict[str, Any]:
    """Interleaved timings of both sides for every K, end to end and models alone."""
    import torch

    largest = max(ks)
    pipeline = build_mtnlp(model_folder, largest, batch_size)
    models = build_separate(model_folder, largest)
    tokenizer, max_length = pipeline.tokenizer, pipeline.max_length_of(pipeline.tasks[0])
    batches = [
        tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        for start in range(0, len(texts), batch_size)
    ]

    @torch.inference_mode()
    def mtnlp_forward(tasks: list[str]) -> None:
        for batch in batches:
            pipeline.model.forward_tasks(tasks, **batch)

    @torch.inference_mode()
    def separate_forward(chosen: Sequence) -> None:
        for model in chosen:
            for batch in batches:
                model(**batch)

    times: dict[str, dict[int, list[float]]] = {
        side: {k: [] for k in ks} for side in ("mtnlp", "separate", "mtnlp_fwd", "separate_fwd")
    }
    pipeline(texts[:batch_size], tasks=pipeline.tasks)  # warm-up
    run_separate(models[:1], tokenizer, texts[:batch_size], batch_size, max_length)
    for round_index in range(rounds):
        for k in ks:
            tasks = pipeline.tasks[:k]
            sides = {
                "mtnlp": lambda tasks=tasks: pipeline(texts, tasks=tasks),
                "separate": lambda k=k: run_separate(
                    models[:k], tokenizer, texts, batch_size, max_length
                ),
                "mtnlp_fwd": lambda tasks=tasks: mtnlp_forward(tasks),
                "separate_fwd": lambda k=k: separate_forward(models[:k]),
            }
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for side in order:
                times[side][k].append(timed(sides[side]))
    result: dict[str, Any] = {"speedup": {}, "speedup_forward": {}, "sentences_per_s": {}}
    for k in ks:
        mtnlp, separate = (spread(times[s][k])["median"] for s in ("mtnlp", "separate"))
        mtnlp_fwd, separate_fwd = (
            spread(times[s][k])["median"] for s in ("mtnlp_fwd", "separate_fwd")
        )
        result["speedup"][str(k)] = separate / mtnlp
        result["speedup_forward"][str(k)] = separate_fwd / mtnlp_fwd
        result["sentences_per_s"][str(k)] = {
            "mtnlp": len(texts) / mtnlp,
            "separate": len(texts) / separate,
        }
    result["meets_target"] = all(result["speedup"][str(k)] >= TARGET * k for k in ks)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    cli = parser(__doc__.splitlines()[0])
    cli.add_argument("--model", default="minilm", help="minilm, tiny, mini, base or a folder")
    cli.add_argument("--data-dir", type=Path, default=DATA_DIR / "glue")
    cli.add_argument("--ks", default="1,2,4,8", help="numbers of tasks")
    cli.add_argument("--sentences", type=int, default=256, help="SST-2 dev sentences per pass")
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--rounds", type=int, default=3)
    options = cli.parse_args(argv)
    if options.quick:
        options.model, options.sentences, options.rounds = "tiny", 64, 1
    setup(options)
    ks = sorted({int(k) for k in options.ks.split(",")})
    texts = sentences(options.data_dir, options.sentences)
    with temporary_folder() as folder:
        model_folder = encoder_folder(options.model, folder / "encoder")
        result = measure(model_folder, texts, ks, options.rounds, options.batch_size)
        result["memory"] = memory(model_folder, texts, max(ks), options.batch_size)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()}
    config["sentences_used"] = len(texts)
    return emit(
        {"benchmark": "inference", "target_per_task": TARGET, **result, "config": config},
        options.output,
    )


if __name__ == "__main__":
    main()
