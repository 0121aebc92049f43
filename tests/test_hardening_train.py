"""Hardening of the training options (issue 11): `--finetune-each` with every sharing strategy,
gradient averaging of parameters that no process touched, and typed, bounded arguments from flags
and `--config` files (the bad values and their messages are in test_bad_input.py)."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from tiny_runs import reset_accelerate, write_tiny_tasks

from mtnlp import training
from mtnlp.artifacts import run_folder
from mtnlp.modeling.model import MultiTaskModel
from mtnlp.training.args import TrainArguments, parse_args
from mtnlp.training.step import average_gradients
from mtnlp.utils.errors import UserError, exit_on_user_error

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ------------------------------------------------------------------------------ finetune-each
@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny"), train_size=16, dev_size=5)


@pytest.mark.parametrize("strategy", ["hard", "soft", "cross_stitch", "sluice"])
def test_finetune_each_starts_every_task_from_its_multi_task_weights(
    strategy, tiny_tasks, tmp_path, monkeypatch
):
    cards, data = tiny_tasks
    starts: list[dict[str, torch.Tensor]] = []  # each stage's initial weights

    original = MultiTaskModel.from_multitask

    def recording(pretrained, specs, sharing=None):
        model = original(pretrained, specs, sharing)
        starts.append(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(MultiTaskModel, "from_multitask", recording)
    monkeypatch.setattr(run_folder, "write_report", lambda *args, **kwargs: None)  # plots: slow
    output = tmp_path / "out"
    reset_accelerate()
    flags = [
        "--model", "tiny", "--cards", str(cards), "--data-dir", str(data), "--tasks", "cls,tag",
        "--output-dir", str(output), "--max-steps", "2", "--batch-size", "8", "--learning-rate",
        "1e-3", "--sharing", strategy, "--sharing-layers", "1", "--finetune-each",
        "--finetune-max-steps", "1",
    ]  # fmt: skip
    training.run(parse_args(flags), [])
    assert set(json.loads((output / "finetune_results.json").read_text())) == {"cls", "tag"}
    trained = MultiTaskModel.from_pretrained(output)
    weights = trained.state_dict()
    assert len(starts) == 3  # the multi-task stage, then one per task
    for task, start in zip(["cls", "tag"], starts[1:], strict=True):
        kept = [key for key in start if key in weights and start[key].shape == weights[key].shape]
        assert all(torch.equal(start[key], weights[key]) for key in kept)
        assert any(key.startswith(f"heads.{task}.") for key in kept)
        columns = [key for key in kept if key.startswith(f"sharing.column.{task}.")]
        assert len(columns) == (0 if strategy == "hard" else 16)  # one BERT layer's tensors
        t = trained.config.task_names.index(task)
        if strategy == "cross_stitch":  # the 1 x 1 unit: the sum of the task's trained row
            assert torch.allclose(
                start["sharing.stitch"][:, 0, 0], weights["sharing.stitch"][:, t].sum(-1)
            )
        if strategy == "sluice":  # alpha: the sum of the task's row of 2 x 2 blocks
            blocks = weights["sharing.alpha"].view(1, 2, 2, 2, 2)[:, t].sum(2)
            assert torch.allclose(start["sharing.alpha"], blocks)
            assert torch.equal(start["sharing.beta"][0], weights["sharing.beta"][t])


# ------------------------------------------------------------------------------ all_tasks, DDP
class FakeProcesses:
    """`count` processes as threads: `reduce` sums or averages a tensor over all of them, as
    accelerate's does over real processes (every one must call it, in the same order)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.barrier = threading.Barrier(count, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * count

    def reduce(self, rank: int, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        total = torch.stack(self.slots).sum(0)
        self.barrier.wait()  # every rank has read the slots before the next reduce
        return total / self.count if reduction == "mean" else total


@dataclass
class FakeAccelerator:
    processes: FakeProcesses
    rank: int

    @property
    def num_processes(self) -> int:
        return self.processes.count

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.processes.reduce(self.rank, tensor, reduction)


def test_average_gradients_leaves_alone_what_no_process_touched():
    torch.manual_seed(0)
    start = {name: torch.randn(3) for name in ("shared", "one_rank", "unused")}
    # rank 0 trained a head that rank 1 did not; no rank used the last parameter
    grads = [{"shared": 1.0, "one_rank": 4.0}, {"shared": 3.0}]
    processes = FakeProcesses(2)

    def step(rank: int) -> tuple[dict, dict]:
        params = {name: torch.nn.Parameter(value.clone()) for name, value in start.items()}
        for name, value in grads[rank].items():
            params[name].grad = torch.full((3,), value)
        average_gradients(params.values(), FakeAccelerator(processes, rank))
        seen = {name: p.grad if p.grad is None else p.grad.tolist() for name, p in params.items()}
        torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.1).step()
        return seen, {name: p.detach() for name, p in params.items()}

    with ThreadPoolExecutor(2) as pool:
        ranks = list(pool.map(step, range(2)))
    for seen, after in ranks:
        assert seen == {"shared": [2.0] * 3, "one_rank": [2.0] * 3, "unused": None}
        assert torch.equal(after["unused"], start["unused"])  # no decay, as with one process
    assert all(torch.equal(ranks[0][1][name], ranks[1][1][name]) for name in start)


# ------------------------------------------------------------------------------ arguments
def test_a_valid_config_file_parses_with_the_right_types(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "epochs: 2\nlearning-rate: 5e-5\nmax_steps: 10\nseed: 0\nwarmup_ratio: 1\n"
        "weight_decay: 0\nmax_grad_norm: 0\ncards: [a.yaml, b.yaml]\nkeep_best: true\n"
        "batch_mode: all_tasks\nweighting: pcgrad\nblock_sparse_q: 2\nhub_model_id: null\n"
    )
    args = parse_args(["--config", str(config), "--seed", "7"])
    assert (args.epochs, args.learning_rate, args.max_steps) == (2.0, 5e-5, 10)
    assert type(args.epochs) is float and type(args.learning_rate) is float  # 5e-5: YAML 1.1 str
    assert (args.seed, args.warmup_ratio, args.weight_decay, args.max_grad_norm) == (7, 1, 0, 0)
    assert type(args.warmup_ratio) is float and type(args.max_steps) is int
    assert args.cards == ["a.yaml", "b.yaml"] and args.keep_best is True
    assert (args.batch_mode, args.block_sparse_q, args.hub_model_id) == ("all_tasks", "2", None)
    # one folder as a string is a list of one, as `--data-dir DIR` on the command line
    config.write_text("data_dir: ../data/glue\ncards: tasks/glue\n")
    args = parse_args(["--config", str(config)])
    assert (args.data_dir, args.cards) == (["../data/glue"], ["tasks/glue"])


def test_every_bad_value_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("max-steps: 10.7\nseed: -1\nepochs: 3\n")
    with pytest.raises(UserError) as error:
        parse_args(["--config", str(config)])
    assert str(error.value).splitlines() == [
        f"{config}: max-steps: expected an integer, got 10.7",
        f"{config}: seed: must be >= 0, got -1",
    ]

    @exit_on_user_error
    def main() -> None:
        raise error.value

    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {config}: max-steps: expected an integer, got 10.7",
        f"error: {config}: seed: must be >= 0, got -1",
    ]


def test_arguments_built_in_code_are_checked_too():
    with pytest.raises(UserError) as error:
        TrainArguments(epochs=0)
    assert str(error.value) == "--epochs: must be positive, got 0"
    with pytest.raises(UserError) as error:
        dataclasses.replace(TrainArguments(), max_steps=2.5)
    assert str(error.value) == "--max-steps: expected an integer, got 2.5"
    assert type(TrainArguments(epochs=1).epochs) is float
