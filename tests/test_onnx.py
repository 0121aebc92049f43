"""ONNX: one graph for every head (`mtnlp export`), its parity with the model at other shapes than
the export's, every layout, the int8 check, prediction through ONNX Runtime (pipeline and CLI).

Tiny in-process models; skipped where onnx / onnxruntime are not installed (`pip install
'mtnlp[onnx]'`), except the test of the error that names that extra.
"""

from __future__ import annotations

import builtins
import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_runs import NAMES, WORDS, write_tiny_tasks

from mtnlp.cli import main
from mtnlp.export.onnx import EXAMPLE_SHAPE, example_inputs, export_onnx
from mtnlp.export.quantize import REPORT, SETTINGS, nodes_between, quantize
from mtnlp.inference.onnx import INT8_FILE, ONNX_FILE, OnnxModel
from mtnlp.inference.pipeline import MultiTaskPipeline
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert
from mtnlp.utils.errors import UserError

from conftest import TINY_TASKS, task_spec

needs_onnx = pytest.mark.skipif(
    find_spec("onnxruntime") is None or find_spec("onnx") is None,
    reason="onnx and onnxruntime are not installed (pip install 'mtnlp[onnx]')",
)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

BATCHES = (1, 3, 32)
LENGTHS = (7, 29)  # the export traced EXAMPLE_SHAPE (2, 16)
TEXTS = ["the cat sat on the mat", "stocks fell", "a dog runs in the park today", "the"]


def task_layer(**options) -> dict:
    return {
        "type": "bilstm", "hidden_size": None, "num_heads": None, "shortcut": True,
        "label_embeddings": True, "label_embedding_size": 8, "dropout": 0.0, **options,
    }  # fmt: skip


def build(tokenizer, specs=TINY_TASKS, sharing=None) -> MultiTaskModel:
    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(tiny_bert(tokenizer), specs, sharing=sharing).eval()


def max_differences(model: MultiTaskModel, graph: OnnxModel, batches, lengths) -> dict:
    """Max |ORT - torch| per task over right-padded random batches of every shape."""
    names = graph.input_names
    worst = dict.fromkeys(model.config.task_names, 0.0)
    for batch in batches:
        for tokens in lengths:
            values = example_inputs(model, names, batch, tokens, seed=batch)
            inputs = dict(zip(names, values, strict=True))
            with torch.no_grad():
                expected = model.forward_tasks(model.config.task_names, **inputs)
            got = graph.forward_tasks(model.config.task_names, **inputs)
            for task, value in worst.items():
                assert got[task].logits.shape == expected[task].logits.shape, task
                diff = (got[task].logits - expected[task].logits).abs().max().item()
                worst[task] = max(value, diff)
    return worst


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    """The tiny classification + regression + tagging model and its export."""
    model = build(tiny_tokenizer)
    folder = export_onnx(
        model, tmp_path_factory.mktemp("onnx") / "export", tokenizer=tiny_tokenizer
    )
    return model, folder


# ------------------------------------------------------------------------------ the graph
@needs_onnx
def test_parity_at_other_batch_sizes_and_lengths(exported):
    model, folder = exported
    assert EXAMPLE_SHAPE[0] not in BATCHES and EXAMPLE_SHAPE[1] not in LENGTHS
    graph = OnnxModel(folder)
    worst = max_differences(model, graph, BATCHES, LENGTHS)
    print("max |ORT fp32 - torch fp32|:", worst)
    assert set(worst) == {"cls", "reg", "tag"}
    assert all(diff <= 1e-4 for diff in worst.values()), worst


@needs_onnx
def test_one_graph_inputs_and_one_output_per_task(exported):
    import onnx

    _, folder = exported
    proto = onnx.load(str(folder / ONNX_FILE))
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in proto.graph.input}  # fmt: skip
    names = ["input_ids", "attention_mask", "token_type_ids"]
    assert inputs == {name: ["batch", "sequence"] for name in names}
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in proto.graph.input)
    assert [output.name for output in proto.graph.output] == ["cls", "reg", "tag"]
    meta = json.loads((folder / "onnx.json").read_text())
    assert meta["exporter"] == "torchscript" and meta["opset"] == 18
    assert meta["outputs"]["cls"] == {"type": "classification", "shape": ["batch", "labels"],
                                      "labels": ["neg", "pos"]}  # fmt: skip
    assert meta["outputs"]["reg"]["shape"] == ["batch"]
    assert meta["outputs"]["tag"]["shape"] == ["batch", "sequence", "labels"]


def jmt(layer_type: str) -> list[dict]:
    return [
        task_spec("pos", "tagging", ["A", "B", "C"], layer=1),
        task_spec("chunk", "tagging", ["O", "B-NP"], stack_on="pos",
                  task_layer=task_layer(type=layer_type, hidden_size=32)),
        task_spec("doc", "classification", ["a", "b"], stack_on="chunk",
                  task_layer=task_layer(type=layer_type, hidden_size=32)),
    ]  # fmt: skip


LAYOUTS = {
    "low supervision": (
        [{**TINY_TASKS[0], "layer": 1}, TINY_TASKS[1], {**TINY_TASKS[2], "layer": 1}],
        None,
    ),
    "jmt bilstm, label embeddings": (jmt("bilstm"), None),
    "jmt transformer, label embeddings": (jmt("transformer"), None),
    "soft": (TINY_TASKS, {"name": "soft"}),
    "cross_stitch": (TINY_TASKS, {"name": "cross_stitch", "layers": 1}),
    "sluice": (TINY_TASKS, {"name": "sluice"}),
}


@needs_onnx
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_exports(layout, tiny_tokenizer, tmp_path):
    specs, sharing = LAYOUTS[layout]
    model = build(tiny_tokenizer, specs, sharing)
    folder = export_onnx(model, tmp_path / "export", tokenizer=tiny_tokenizer)
    meta = json.loads((folder / "onnx.json").read_text())
    assert meta["exporter"] == ("dynamo" if "transformer" in layout else "torchscript")
    worst = max_differences(model, OnnxModel(folder), (1, 3), (7,))
    assert all(diff <= 1e-4 for diff in worst.values()), worst


@needs_onnx
def test_a_layout_no_exporter_handles_is_one_line(tiny_tokenizer, tmp_path):
    specs = jmt("bilstm")
    specs[2]["task_layer"]["type"] = "transformer"  # a bilstm and a transformer layer
    with pytest.raises(UserError) as error:
        export_onnx(build(tiny_tokenizer, specs), tmp_path / "x", tokenizer=tiny_tokenizer)
    message = str(error.value)
    assert "\n" not in message and message.startswith("MultiTaskModel: cannot export to ONNX")
    assert "a transformer task layer" in message and "a bilstm task layer" in message
    assert not (tmp_path / "x").exists()


def test_without_onnxruntime_one_line_names_the_extra(tiny_tokenizer, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    for call in (
        lambda: export_onnx(build(tiny_tokenizer), tmp_path / "x", tokenizer=tiny_tokenizer),
        lambda: MultiTaskPipeline.from_onnx(tmp_path),
    ):
        with pytest.raises(UserError, match=r"pip install 'mtnlp\[onnx\]'$"):
            call()


# ------------------------------------------------------------------------------ prediction
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny model with cards and local data (cls, reg on pairs, tag) and its export."""
    root = tmp_path_factory.mktemp("run")
    cards, data = write_tiny_tasks(root, train_size=4, dev_size=200)
    model = save_model(root / "model", cards)
    return model, data, export_onnx(model, root / "export")


def save_model(folder: Path, cards: Path) -> Path:
    """An untrained tiny model of the cards, saved as training saves a run. Its tokenizer's
    vocabulary is the tiny tasks' words in a fixed order (a trained WordPiece vocabulary's order
    changes from run to run), so the model, and the int8 check's outcome, is the same each run."""
    from transformers import BertTokenizer

    from mtnlp.artifacts.run_folder import save_run
    from mtnlp.cards.load import load_cards

    vocab = folder.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *NAMES]))
    tokenizer = BertTokenizer(vocab_file=str(vocab))
    chosen = load_cards([cards])
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tokenizer), [c.model_spec() for c in chosen])
    save_run(folder, model, tokenizer, chosen, {}, [], {})
    return folder


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines (transformers' loading progress bar may come before)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def same_predictions(torch_results, onnx_results) -> None:
    """Labels, tags and everything else identical; scores and values (floats) within 1e-4."""
    if isinstance(torch_results, float):
        assert onnx_results == pytest.approx(torch_results, abs=1e-4)
    elif isinstance(torch_results, (dict, list)):
        assert type(onnx_results) is type(torch_results) and len(onnx_results) == len(torch_results)
        if isinstance(torch_results, dict):
            assert onnx_results.keys() == torch_results.keys()
            torch_results, onnx_results = torch_results.values(), onnx_results.values()
        for mine, theirs in zip(torch_results, onnx_results, strict=True):
            same_predictions(mine, theirs)
    else:
        assert onnx_results == torch_results


@needs_onnx
def test_export_folder_predicts_alone(tiny_run, tmp_path):
    """The folder holds all that prediction needs: moved away from the model, same results."""
    model_folder, _, export = tiny_run
    assert {ONNX_FILE, "config.json", "label_maps.json", "onnx.json", "tokenizer.json",
            "cards"} <= {path.name for path in export.iterdir()}  # fmt: skip
    assert not list(export.glob("*.safetensors"))
    alone = shutil.copytree(export, tmp_path / "alone")
    torch_pipeline = MultiTaskPipeline(*load(model_folder))
    onnx_pipeline = MultiTaskPipeline.from_onnx(alone)
    pairs = [{"text": a, "text_pair": b} for a, b in zip(TEXTS, reversed(TEXTS), strict=True)]
    for inputs in (TEXTS, pairs):
        same_predictions(torch_pipeline(inputs), onnx_pipeline(inputs))


def load(folder):
    from mtnlp.inference.loading import load_model

    return load_model(str(folder))


@needs_onnx
def test_predict_backend_onnx_same_lines_and_files(tiny_run, tmp_path, capsys):
    model_folder, data, export = tiny_run
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    outputs = {}
    backends = {"torch": (model_folder, []), "onnx": (export, ["--backend", "onnx"])}
    for name, (folder, backend) in backends.items():
        main(["predict", str(folder), "--input", str(inputs), *backend])
        outputs[name] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        main(["predict", str(folder), "--split", "validation", "--data-dir", str(data),
              "--output-dir", str(tmp_path / name), *backend])  # fmt: skip
        capsys.readouterr()
    same_predictions(outputs["torch"], outputs["onnx"])
    for file in ("cls.tsv", "reg.tsv", "tag.tsv"):
        torch_rows = (tmp_path / "torch" / file).read_text().splitlines()
        onnx_rows = (tmp_path / "onnx" / file).read_text().splitlines()
        if file == "reg.tsv":  # values to 6 significant digits: within 1e-4
            mine, theirs = ([float(row.split("\t")[1]) for row in rows[1:]]
                            for rows in (torch_rows, onnx_rows))  # fmt: skip
            assert np.allclose(mine, theirs, atol=1e-4)
        else:
            assert torch_rows == onnx_rows


@needs_onnx
def test_predict_flag_mistakes_are_one_line(tiny_run, tmp_path, capsys):
    model_folder, _, export = tiny_run
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"text": TEXTS[0]}) + "\n")
    for args, message in (
        ([str(export), "--backend", "onnx", "--dtype", "bf16"], "--dtype: not with --backend onnx"),
        ([str(export), "--onnx-file", INT8_FILE], "--onnx-file: only with --backend onnx"),
        ([str(model_folder), "--backend", "onnx"], f"no {ONNX_FILE} (an `mtnlp export` folder"),
        ([str(export), "--backend", "onnx", "--onnx-file", INT8_FILE], f"no {INT8_FILE}"),
    ):
        with pytest.raises(SystemExit):
            main(["predict", *args, "--input", str(inputs)])
        [error] = error_lines(capsys.readouterr().err)
        assert message in error, error


# ------------------------------------------------------------------------------ int8
@needs_onnx
def test_int8_kept_when_it_agrees(tiny_run, tmp_path, capsys):
    """Mean pooling spreads the tiny random model's sentence outputs apart, so int8 agrees."""
    _, data, _ = tiny_run
    cards = tmp_path / "cards"
    shutil.copytree(tiny_run[0] / "cards", cards)
    for name in ("cls", "reg"):
        path = cards / f"{name}.yaml"
        path.write_text(path.read_text() + "head: {pooling: mean}\n")
    model = save_model(tmp_path / "model", cards)
    main(["export", str(model), str(tmp_path / "export"), "--quantize", "int8",
          "--data-dir", str(data)])  # fmt: skip
    out = capsys.readouterr().out
    print(out)
    report = json.loads((tmp_path / "export" / REPORT).read_text())
    assert report["file"] == INT8_FILE and report["attempts"][-1]["passed"]
    assert f"kept {INT8_FILE}: {report['setting']}" in out and "agreement" in out
    rows = {row["task"]: row for row in report["attempts"][-1]["tasks"]}
    assert rows["cls"]["agreement"] >= 0.99 and rows["tag"]["agreement"] >= 0.99
    assert abs(rows["reg"]["score"]["change"]) <= 0.005
    assert rows["cls"]["examples"] == 200 and rows["tag"]["words"] > 200
    int8 = MultiTaskPipeline.from_onnx(tmp_path / "export", file=INT8_FILE)
    assert set(int8(TEXTS[0])) == {"cls", "tag"}
    assert (tmp_path / "export" / INT8_FILE).stat().st_size < (
        tmp_path / "export" / ONNX_FILE
    ).stat().st_size


@needs_onnx
def test_int8_refused_when_no_setting_agrees(tiny_run, tmp_path, capsys):
    """The tiny random model's [CLS] outputs barely differ between sentences: int8 noise
    reorders them, so its regression's Pearson moves and the export is refused."""
    model_folder, data, _ = tiny_run
    with pytest.raises(SystemExit):
        main(["export", str(model_folder), str(tmp_path / "export"), "--quantize", "int8",
              "--data-dir", str(data), "--max-eval-samples", "30"])  # fmt: skip
    captured = capsys.readouterr()
    [error] = error_lines(captured.err)
    # 3 settings: a 2-layer encoder has no layer between its first and last to quantize alone
    assert error.startswith("error: --quantize int8: none of the 3 settings keeps accuracy")
    assert "reg: Pearson moves by" in error and error.endswith("export without --quantize")
    assert captured.out.count("int8 (") == 3 and "30 " in captured.out
    assert not (tmp_path / "export").exists()


@needs_onnx
def test_first_and_last_layers_stay_fp32(tiny_tokenizer, tmp_path):
    """The last fallback quantizes only the nodes of the layers in between, found by weight."""
    import onnx

    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer, num_layers=4), TINY_TASKS)
    folder = export_onnx(model, tmp_path / "export", tokenizer=tiny_tokenizer)
    between = nodes_between(folder / ONNX_FILE, model)
    assert len(between) == 2 * 6  # layers 1 and 2: query, key, value, output, intermediate, output
    assert all("/layer.1/" in name or "/layer.2/" in name for name in between), between
    quantize(folder / ONNX_FILE, tmp_path / "int8.onnx", SETTINGS[-1], between)
    quantized = [n.name for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node
                 if n.op_type == "MatMulInteger"]  # fmt: skip
    assert sorted(quantized) == sorted(f"{name}_quant" for name in between)


@needs_onnx
def test_export_mistakes_are_one_line(tiny_run, tmp_path, capsys):
    model_folder, data, export = tiny_run
    for args, message in (
        ([str(model_folder), str(export)], "exists and is not an empty folder"),
        ([str(model_folder), str(tmp_path / "a"), "--data-dir", str(data)], "only with --quantize"),
        ([str(model_folder), str(tmp_path / "b"), "--format", "encoder", "--opset", "17"],
         "apply to --format onnx only"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["export", *args])
        [error] = error_lines(capsys.readouterr().err)
        assert message in error, error
