"""The layers hold at run time, each checked in a fresh interpreter: a saved model loads with
torch + transformers + safetensors alone, `import mtnlp` loads neither torch nor transformers yet
registers the model with transformers' Auto classes, raw-text prediction needs neither the
training loop nor `datasets`; and `lint-imports` keeps the contracts in pyproject.toml.

transformers itself imports accelerate when it is installed (`modeling_utils`), so "mtnlp loads
no accelerate" cannot be read off `sys.modules` as such. Instead the scripts below hide the
packages a layer must not need (`sys.modules[name] = None`: importing one raises ImportError, and
transformers sees it as not installed); the code must then work, and none of them may be loaded.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_runs import write_tiny_tasks

from mtnlp.artifacts.run_folder import save_run
from mtnlp.cards.load import load_cards
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.modeling.tiny import tiny_bert

from conftest import REPO, TINY_TASKS, run_command

HIDDEN = ("accelerate", "datasets", "evaluate", "matplotlib")  # packages, hidden in the scripts


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny model of the three core task types, with its tokenizer."""
    folder = tmp_path_factory.mktemp("layers") / "model"
    torch.manual_seed(0)
    MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), TINY_TASKS).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def run_script(body: str, hide: tuple[str, ...] = HIDDEN) -> dict:
    """Run `body` in a fresh interpreter with the packages `hide` hidden; it sets `result` (a
    dict). Returns `result` plus `loaded`: the mtnlp modules and hidden packages in sys.modules."""
    script = "\n".join(
        [
            "import json, sys",
            f"for name in {hide!r}:",
            "    sys.modules[name] = None  # import raises ImportError; not 'installed' either",
            "result = {}",
            textwrap.dedent(body),
            "loaded = sorted(name for name, module in sys.modules.items() if module is not None",
            f"                and (name.startswith('mtnlp') or name.split('.')[0] in {hide!r}))",
            "print(json.dumps({**result, 'loaded': loaded}))",
        ]
    )
    completed = run_command([sys.executable, "-c", script], cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def under(loaded: list[str], package: str) -> list[str]:
    return [name for name in loaded if name == package or name.startswith(f"{package}.")]


def test_a_saved_model_loads_with_torch_transformers_and_safetensors_alone(model_folder):
    result = run_script(
        f"""
        import torch
        import mtnlp.modeling
        from transformers import AutoModel

        model = mtnlp.modeling.MultiTaskModel.from_pretrained({str(model_folder)!r})
        same = AutoModel.from_pretrained({str(model_folder)!r})
        ids = torch.tensor([[2, 7, 8, 3]])
        outputs = model.forward_tasks(["cls", "reg", "tag"], input_ids=ids)
        result["shapes"] = {{task: list(o.logits.shape) for task, o in outputs.items()}}
        result["auto"] = type(same).__name__
        """
    )
    assert result["shapes"] == {"cls": [1, 2], "reg": [1], "tag": [1, 4, 3]}
    assert result["auto"] == "MultiTaskModel"
    for package in (*HIDDEN, "mtnlp.cards", "mtnlp.training", "mtnlp.data"):
        assert not under(result["loaded"], package), package


def test_import_mtnlp_stays_light():
    result = run_script(
        """
        import mtnlp

        result["public"] = [name for name in mtnlp.__all__ if name in vars(mtnlp)]
        result["heavy"] = sorted({"numpy", "torch", "transformers"} & set(sys.modules))
        result["model"] = mtnlp.MultiTaskModel.__name__  # lazy: loads on first use
        """
    )
    assert result["heavy"] == []
    assert result["public"] == ["UserError"]  # every other name loads on first use
    assert result["model"] == "MultiTaskModel"
    for package in (*HIDDEN, "mtnlp.training", "mtnlp.hub", "mtnlp.inference", "mtnlp.cards"):
        assert not under(result["loaded"], package), package


@pytest.mark.parametrize(
    "first",
    [
        "import mtnlp; from transformers import AutoModel",
        "import transformers; import mtnlp",
        # as accelerate checks what is installed: the hook waits for the import itself
        "import mtnlp, importlib.util; importlib.util.find_spec('transformers')",
    ],
    ids=["mtnlp-first", "transformers-first", "looked-up-first"],
)
def test_import_mtnlp_registers_the_model_with_the_auto_classes(first, model_folder):
    """Whichever is imported first, `import mtnlp` is all `AutoModel.from_pretrained` needs; the
    import hook behind it leaves no trace in transformers nor on `sys.meta_path`."""
    result = run_script(
        f"""
        {first}
        import importlib.machinery

        from transformers import AutoConfig, AutoModel

        result["config"] = type(AutoConfig.from_pretrained({str(model_folder)!r})).__name__
        result["model"] = type(AutoModel.from_pretrained({str(model_folder)!r})).__name__
        result["hooks"] = [type(f).__name__ for f in sys.meta_path if "mtnlp" in type(f).__module__]
        loader = sys.modules["transformers"].__spec__.loader
        result["loader"] = isinstance(loader, importlib.machinery.SourceFileLoader)
        """
    )
    assert (result["config"], result["model"]) == ("MultiTaskConfig", "MultiTaskModel")
    assert result["hooks"] == []
    assert result["loader"] is True


def test_the_pipeline_loads_on_first_use_and_registers_with_transformers():
    result = run_script(
        """
        import mtnlp
        from transformers.pipelines import PIPELINE_REGISTRY

        result["before"] = "mtnlp-multi-task" in PIPELINE_REGISTRY.get_supported_tasks()
        mtnlp.MultiTaskPipeline
        result["after"] = "mtnlp-multi-task" in PIPELINE_REGISTRY.get_supported_tasks()
        """
    )
    assert (result["before"], result["after"]) == (False, True)
    for package in (*HIDDEN, "mtnlp.training", "mtnlp.hub"):
        assert not under(result["loaded"], package), package


def test_raw_text_prediction_needs_neither_training_nor_datasets(model_folder):
    result = run_script(
        f"""
        import io
        from transformers import AutoTokenizer

        from mtnlp.inference.pipeline import MultiTaskPipeline
        from mtnlp.inference.rows import RowPredictor, read_rows
        from mtnlp.modeling.model import MultiTaskModel

        model = MultiTaskModel.from_pretrained({str(model_folder)!r})
        tokenizer = AutoTokenizer.from_pretrained({str(model_folder)!r})
        predict = RowPredictor(MultiTaskPipeline(model, tokenizer), ["cls", "tag"], "stdin")
        lines = b'{{"id": 1, "text": "the cat sat"}}\\n{{"id": 2, "text": "a dog runs"}}\\n'
        rows = list(read_rows(io.BytesIO(lines), "stdin", "jsonl"))
        result["outputs"] = predict(rows)
        """
    )
    assert [sorted(output) for output in result["outputs"]] == [["cls", "id", "tag"]] * 2
    for package in (*HIDDEN, "mtnlp.training", "mtnlp.hub"):
        assert not under(result["loaded"], package), package


def test_mtnlp_evaluate_does_not_import_the_training_loop(tmp_path, tiny_tokenizer):
    cards_dir, data_dir = write_tiny_tasks(tmp_path, train_size=4, dev_size=5)
    cards = load_cards([cards_dir])
    torch.manual_seed(0)
    model = MultiTaskModel.from_encoder(tiny_bert(tiny_tokenizer), [c.model_spec() for c in cards])
    save_run(tmp_path / "model", model, tiny_tokenizer, cards, {}, [], {})
    result = run_script(
        f"""
        import contextlib, io
        from mtnlp.cli import main

        with contextlib.redirect_stdout(io.StringIO()) as out:
            main(["evaluate", {str(tmp_path / "model")!r}, "--data-dir", {str(data_dir)!r}])
        result["tasks"] = sorted(json.loads(out.getvalue()))
        """,
        hide=("matplotlib",),
    )
    assert result["tasks"] == ["cls", "reg", "tag"]
    for package in ("matplotlib", "mtnlp.training", "mtnlp.hub"):
        assert not under(result["loaded"], package), package


def test_import_contracts_are_kept():
    """The contracts in pyproject.toml (layers, training's own layers, the forbidden imports of
    the model layer and of raw-text prediction), lazy imports included."""
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(command).is_file():
        pytest.skip("lint-imports (import-linter) is not installed")
    completed = run_command([command, "--no-cache"], cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "0 broken" in completed.stdout
