"""The bench scripts' core functions on tiny sizes, and length-grouped batching.

The scripts' --quick modes take up to a minute each on two busy cores, so this file runs their
core functions in-process with smaller sizes instead.
"""

from __future__ import annotations

import json
import math
import sys
from importlib.util import find_spec

import datasets
import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO))  # the bench scripts are modules of the repository's bench/ folder

from bench import common, compare, glue_quality, inference, overhead, padding, peer
from mtnlp.cards.load import load_cards
from mtnlp.data.loaders import example_lengths, make_dataloader


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer):
    """A tiny random BERT and a 200-word vocabulary (cheap for datasets to fingerprint)."""
    from mtnlp.modeling.tiny import tiny_bert

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tiny_bert(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def sst2_card():
    return load_cards([common.GLUE_CARDS], ["sst2"])[0]


def variable_lengths(count: int = 200) -> datasets.Dataset:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(3, 60, (count,), generator=generator).tolist()
    ids = [[101, *range(1000, 1000 + size - 2), 102] for size in sizes]
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": [0] * count}
    )


# ------------------------------------------------------------------------------ grouping
def test_group_by_length_pads_less_and_keeps_every_example(tiny_tokenizer, sst2_card):
    dataset = variable_lengths()
    sizes = example_lengths(dataset)
    assert sizes == [len(ids) for ids in dataset["input_ids"]]
    shares = {}
    for grouped in (False, True):
        loader = make_dataloader(
            sst2_card, dataset, tiny_tokenizer, 8, shuffle=True, seed=3, group_by_length=grouped
        )
        batches = list(loader.batch_sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(len(dataset)))
        shares[grouped] = sum(padding.batch_padding(sizes, batches)) / len(batches)
    assert shares[True] < 0.5 * shares[False]


def test_group_by_length_order_follows_the_generator(tiny_tokenizer, sst2_card):
    """Same seed, same order; a restored generator state replays the epoch (resume)."""
    dataset = variable_lengths()

    def loader(seed: int):
        return make_dataloader(
            sst2_card, dataset, tiny_tokenizer, 8, shuffle=True, seed=seed, group_by_length=True
        )

    first, again, other = loader(1), loader(1), loader(2)
    state = first.generator.get_state()
    order = [batch["input_ids"].shape for batch in first]
    assert order == [batch["input_ids"].shape for batch in again]
    assert list(first.batch_sampler) != list(other.batch_sampler)
    first.generator.set_state(state)
    assert [batch["input_ids"].shape for batch in first] == order
    with pytest.raises(ValueError, match="shuffle"):
        make_dataloader(sst2_card, dataset, tiny_tokenizer, 8, shuffle=False, group_by_length=True)


def test_group_by_length_flag_parses():
    from mtnlp.training.args import parse_args

    assert parse_args(["--group-by-length"]).group_by_length is True
    assert parse_args([]).group_by_length is False


def test_batch_padding():
    assert padding.batch_padding([4, 2, 4, 4], [[0, 1], [2, 3]]) == [0.25, 0.0]


# ------------------------------------------------------------------------------ common
def test_peak_rss_and_emit(capsys, tmp_path):
    with common.PeakRSS() as peak:
        block = bytearray(64 * 2**20)  # 64 MB, touched
        block[::4096] = b"x" * len(block[::4096])
    assert peak.mb is not None and peak.mb > 64
    assert common.spread([1.0, 2.0, 3.0, 4.0])["median"] == 2.5
    written = common.emit({"value": 1 / 3}, tmp_path / "out.json")
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out.json").read_text()) == written
    assert printed["value"] == 0.33333
    assert printed["machine"]["cores"] >= 1 and "torch" in printed["machine"]["versions"]


def test_rounded_keeps_significant_digits():
    """Small values such as learning rates survive (4 decimals would print 8e-5 as 1e-4)."""
    values = {"lr": 8e-5, "times": [1234.5678, 0.123456], "name": "x", "steps": 7}
    assert common.rounded(values) == {
        "lr": 8e-5, "times": [1234.6, 0.12346], "name": "x", "steps": 7,
    }  # fmt: skip


# ------------------------------------------------------------------------------ overhead
def test_overhead_times_the_same_batches_in_both_loops(
    tiny_folder, data_dir, tmp_path, monkeypatch
):
    """Pairs are timed, and the plain loop trains on exactly the batches mtnlp trained on."""
    from mtnlp.training import mixing

    seen = {"mtnlp": [], "plain": []}
    original_next = mixing.TaskStreams.next

    def recording_next(self, task):
        batch = original_next(self, task)
        seen["mtnlp"].append(batch["input_ids"].clone())
        return batch

    def recording_endless(loader):
        while True:
            for batch in loader:
                seen["plain"].append(batch["input_ids"].clone())
                yield batch

    monkeypatch.setattr(mixing.TaskStreams, "next", recording_next)
    monkeypatch.setattr(overhead, "_endless", recording_endless)
    result = overhead.measure(
        tiny_folder,
        "fp32",
        tasks="rte,mrpc",
        steps=3,
        warmup=1,
        batch_size=4,
        max_train_samples=16,
        data_dir=data_dir / "glue",
        output_dir=tmp_path / "run",
    )
    assert result["pairs"] == 3
    assert math.isfinite(result["ratio_median"]) and result["ratio_median"] > 0
    assert result["peak_rss_mb_train"] > 0
    assert len(seen["mtnlp"]) == len(seen["plain"]) == 4
    for mine, plain in zip(seen["mtnlp"], seen["plain"], strict=True):
        assert torch.equal(mine, plain)


# ------------------------------------------------------------------------------ inference
def test_inference_speedup_per_k(tiny_folder, data_dir):
    texts = inference.sentences(data_dir / "glue", 8)
    assert len(texts) == 8 and all(isinstance(text, str) for text in texts)
    result = inference.measure(tiny_folder, texts, [1, 2], rounds=1, batch_size=4)
    assert set(result["speedup"]) == set(result["speedup_forward"]) == {"1", "2"}
    assert all(value > 0 for value in result["speedup"].values())
    assert result["sentences_per_s"]["2"]["mtnlp"] > 0


def test_separate_models_predict_labels_and_scores(tiny_folder):
    from transformers import AutoTokenizer

    models = inference.build_separate(tiny_folder, 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    results = inference.run_separate(models, tokenizer, ["a b", "c d e"], 4, 16)
    assert len(results) == 4  # 2 models x 2 sentences
    assert all(0.5 <= result["score"] <= 1 for result in results)


# ------------------------------------------------------------------------------ onnx
@pytest.mark.skipif(
    find_spec("onnxruntime") is None or find_spec("onnx") is None,
    reason="onnx and onnxruntime are not installed (pip install 'mtnlp[onnx]')",
)
def test_onnx_backends_speed_and_dev_scores(tiny_folder, data_dir, tmp_path):
    """bench/onnx.py's core on a tiny model: every backend timed on short and long inputs, and
    the ORT graph scoring the dev data as the PyTorch model does."""
    from bench import onnx as onnx_bench
    from mtnlp.export.onnx import export_onnx

    model = onnx_bench.quick_model(tiny_folder, tmp_path / "model")
    export = export_onnx(model, tmp_path / "export")
    backends = {
        name: onnx_bench.backend(name, model, export, threads=1, batch_size=4)
        for name in ("torch_fp32", "torch_bf16", "ort_fp32")
    }
    assert backends["ort_fp32"][2] == {"short": ["sst2"], "long": ["rte"]}
    assert onnx_bench.file_size_mb("ort_fp32", model, export) > 0
    inputs = onnx_bench.glue_inputs(data_dir / "glue", 6)
    assert len(inputs["short"]) == len(inputs["long"]) == 6 and len(inputs["long"][0]) == 2
    speed = onnx_bench.measure_speed(backends, inputs, rounds=1, batch_size=4)
    for name in backends:
        for kind in ("short", "long"):
            figures = speed[name][kind]
            assert figures["sentences_per_s_batch_4"] > 0 and figures["sentences_per_s_batch_1"] > 0
            assert 0 < figures["latency_ms_batch_1"]["p50"] <= figures["latency_ms_batch_1"]["p95"]
    scores = onnx_bench.dev_scores(backends, export, data_dir / "glue", 8)
    assert scores["ort_fp32"] == scores["torch_fp32"]
    sst2 = scores["torch_fp32"]["sst2"]
    assert sst2["glue_score"] == 100 * sst2["accuracy"]


# ------------------------------------------------------------------------------ glue quality
def test_glue_quality_summary():
    names = {"rte": ["accuracy"], "mrpc": ["accuracy", "f1"]}

    def run(setting, rte, mrpc_f1):
        metrics = {"rte": {"accuracy": rte}, "mrpc": {"accuracy": 0.8, "f1": mrpc_f1}}
        return {"setting": setting, "metrics": metrics, "wall_seconds": 2.0,
                "train_examples": 100, "peak_rss_mb": 10.0}  # fmt: skip

    runs = [
        run(glue_quality.SINGLE, 0.5, 0.8),
        run(glue_quality.SINGLE, 0.7, 0.8),
        run(glue_quality.MULTI, 0.7, 0.9),
        run(glue_quality.MULTI, 0.7, 0.9),
    ]
    summary = glue_quality.summarize(runs, names)
    single = summary["settings"][glue_quality.SINGLE]
    assert single["tasks"]["rte"]["mean"] == pytest.approx(60.0)
    assert single["tasks"]["rte"]["std"] == pytest.approx(math.sqrt(200))
    assert single["glue_average"]["mean"] == pytest.approx((60 + 80) / 2)
    assert single["wall_seconds"] == 2.0 and single["train_examples"] == 100
    assert summary["multi_task_gain"] == pytest.approx({"rte": 10.0, "mrpc": 5.0})


# ------------------------------------------------------------------------------ peer baseline
def test_peer_labels_first_subwords_as_run_ner_and_mtnlp_do(tiny_tokenizer):
    from mtnlp.data.words import align_labels

    words = ["unbelievably", "good", "Peter", "the"]
    word_ids = tiny_tokenizer(words, is_split_into_words=True).word_ids()
    assert word_ids == [None, 0, 1, 2, 2, 2, 2, 2, 3, None]  # "Peter": p ##e ##t ##e ##r
    labels = peer.first_subword_labels(word_ids, [0, 0, 1, 0])
    assert labels == [-100, 0, 0, 1, -100, -100, -100, -100, 0, -100]
    assert labels == align_labels(word_ids, [0, 0, 1, 0], all_subtokens=False)


def test_peer_trains_through_the_trainer_and_resumes(
    tiny_folder, data_dir, tmp_path, capsys, monkeypatch
):
    """Two tiny runs (4 steps each) written as JSON lines as they finish; --resume skips them."""
    output = tmp_path / "peer.jsonl"
    argv = [
        "--model", tiny_folder, "--data-dir", str(data_dir), "--tasks", "rte,ner", "--seeds", "1",
        "--max-train-samples", "16", "--max-eval-samples", "16", "--epochs", "2",
        "--batch-size", "8", "--learning-rate", "1e-3", "--score-test", "--output", str(output),
    ]  # fmt: skip
    result = peer.main(argv)
    header, rte, ner, summary = map(json.loads, output.read_text().splitlines())
    assert header["settings"]["epochs"] == 2.0 and "cpu" in header["machine"]
    assert rte["setting"] == ner["setting"] == "peer (Trainer)"
    assert set(rte["metrics"]["rte"]) == {"accuracy"}  # GLUE's test split has no labels
    assert rte["score"] == pytest.approx(100 * rte["metrics"]["rte"]["accuracy"])
    assert rte["main_score"] == rte["metrics"]["rte"]["accuracy"]
    assert rte["train_examples"] == 32 and rte["train_examples_per_second"] > 0
    ner_metrics = ner["metrics"]["ner"]
    assert {"overall_f1", "overall_f1_test", "overall_accuracy_test"} <= set(ner_metrics)
    assert ner["score"] == pytest.approx(100 * ner_metrics["overall_f1"])
    settings = summary["summary"]["peer (Trainer)"]
    assert settings == result["settings"]["peer (Trainer)"]
    both = pytest.approx((rte["score"] + ner["score"]) / 2, rel=1e-4)  # 5 significant digits
    assert settings["glue_average"]["mean"] == both
    assert settings["wall_seconds"] == pytest.approx(
        rte["wall_seconds"] + ner["wall_seconds"], rel=1e-4
    )
    capsys.readouterr()

    with pytest.raises(SystemExit, match="exists; pass --resume to continue it"):
        peer.main(argv)
    with pytest.raises(SystemExit, match="holds runs with other settings"):
        peer.main([*argv, "--resume", "--epochs", "1"])
    lines = len(output.read_text().splitlines())

    def no_training(*args):
        raise AssertionError("a run the file already has was trained again")

    monkeypatch.setattr(peer, "one_run", no_training)
    again = peer.main([*argv, "--resume"])
    assert again["settings"] == result["settings"]
    assert len(output.read_text().splitlines()) == lines + 2  # a header and a summary


def test_compare_puts_both_sides_in_one_table(tmp_path, capsys):
    """mean ± sd per task and setting, the gain and time against the peer; a peer seed that did
    not run every task is left out."""

    def run(setting, seed, wall, **accuracies):
        metrics = {task: {"accuracy": value} for task, value in accuracies.items()}
        if "mrpc" in metrics:
            metrics["mrpc"]["f1"] = metrics["mrpc"]["accuracy"] + 0.1
        return {"setting": setting, "seed": seed, "metrics": metrics, "wall_seconds": wall,
                "train_examples": 100 * len(metrics), "peak_rss_mb": 500.0}  # fmt: skip

    mtnlp_runs = [run("multi-task", seed, 15.0, rte=0.7, mrpc=0.8) for seed in (1, 2)]
    machine = {"date": "2026-12-07", "commit": "abc", "cpu": "EPYC", "torch_threads": 1}
    (tmp_path / "mtnlp.json").write_text(json.dumps({"runs": mtnlp_runs, "machine": machine}))
    peer_lines = [
        {"benchmark": "peer", "machine": machine},
        run("peer (Trainer)", 1, 10.0, rte=0.6),
        run("peer (Trainer)", 1, 10.0, mrpc=0.7),
        run("peer (Trainer)", 2, 10.0, rte=0.7),
        run("peer (Trainer)", 2, 10.0, mrpc=0.8),
        run("peer (Trainer)", 3, 10.0, rte=0.5),  # interrupted before mrpc
    ]
    (tmp_path / "peer.jsonl").write_text("".join(json.dumps(line) + "\n" for line in peer_lines))
    text = compare.main([str(tmp_path / "mtnlp.json"), str(tmp_path / "peer.jsonl")])
    assert capsys.readouterr().err == "left out (not every task ran): peer (Trainer) seed 3\n"
    # peer: rte 60, 70; mrpc (0.7 + 0.8) / 2 = 75, 85; average 67.5, 77.5
    assert text.splitlines()[:4] == [
        "| setting | rte | mrpc | average | Δ average | wall s / seed | × time | examples / seed "
        "| examples/s | peak RSS MB | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| multi-task | 70.0 ± 0.0 | 85.0 ± 0.0 | 77.5 ± 0.0 | +5.0 | 15 | 0.75 | 200 | 13.3 | 500 "
        "| 2 |",
        "| peer (Trainer) | 65.0 ± 7.1 | 80.0 ± 7.1 | 72.5 ± 7.1 | +0.0 | 20 | 1.00 | 200 | 10.0 "
        "| 500 | 2 |",
    ]
    assert "- `peer.jsonl`: 2026-12-07, commit abc, EPYC, 1 torch threads" in text
    with pytest.raises(SystemExit, match="--baseline 'single-task': no such setting"):
        compare.main([str(tmp_path / "peer.jsonl"), "--baseline", "single-task"])


def test_score_names_of_sentence_and_tagging_cards():
    cards = load_cards([common.GLUE_CARDS, common.CONLL_CARDS], ["mrpc", "stsb", "chunk", "pos"])
    assert [common.score_names(card) for card in cards] == [
        ["accuracy", "f1"], ["pearson", "spearmanr"], ["overall_f1"], ["accuracy"],
    ]  # fmt: skip
