"""The `mtnlp` command: train, evaluate, predict, check task cards, push to the Hub.

    mtnlp train --model tiny --data-dir ../shared/data/glue --tasks rte,mrpc --max-steps 50
    mtnlp evaluate outputs/glue4 --data-dir ../shared/data/glue --max-eval-samples 500
    echo '{"text": "A gripping film."}' | mtnlp predict outputs/glue4 --tasks cola
    mtnlp predict outputs/glue4 --split test --data-dir ../shared/data/glue --output-dir glue4-test
    mtnlp cards check tasks/
    mtnlp push outputs/glue4 --hub-model-id your-name/glue4
    mtnlp export outputs/glue4 glue4-onnx --quantize int8 --data-dir ../shared/data/glue
    mtnlp export outputs/glue4 rte-bert --format transformers --task rte

`mtnlp train` takes the recipes' flags (`mtnlp train --help`); on several GPUs run it as
`accelerate launch -m mtnlp.cli train ...`. Every user mistake is one `error:` line and exit 2.
Each command imports what it needs when it runs (only train and evaluate load datasets and
accelerate).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mtnlp.utils.errors import (
    USER_ERROR_EXIT_CODE,
    OneLineArgumentErrors,
    UserError,
    exit_on_user_error,
)

if TYPE_CHECKING:
    from mtnlp.inference.pipeline import MultiTaskPipeline

DEFAULT_CARDS = Path("tasks/glue")  # relative to the working folder, as in a checkout


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _task_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


# ------------------------------------------------------------------------------ commands
def train_command(argv: Sequence[str]) -> None:
    """`mtnlp train`: the recipe's training run, cards defaulting to ./tasks/glue."""
    from mtnlp.training.args import parse_args

    args = parse_args(
        list(argv),
        prog="mtnlp train",
        description="Multi-task fine-tuning of one shared encoder on task cards "
        f"(default cards: {DEFAULT_CARDS}/ in the working folder).",
    )
    defaults = [DEFAULT_CARDS] if DEFAULT_CARDS.is_dir() else []
    if not args.cards and not defaults:
        raise UserError(
            f"--cards: give task-card files or folders (there is no {DEFAULT_CARDS} here)"
        )
    from mtnlp.training.stages import run  # the training stack, once the flags parse

    run(args, default_cards=defaults)


def evaluate_command(args: argparse.Namespace) -> None:
    """`mtnlp evaluate`: dev metrics per task as JSON on stdout."""
    from accelerate import Accelerator

    from mtnlp.artifacts.run_folder import model_cards
    from mtnlp.cards.load import load_cards
    from mtnlp.data.loaders import make_dataloader
    from mtnlp.data.tokenize import load_task
    from mtnlp.inference.evaluate import cards_for_split, check_custom_metrics, evaluate
    from mtnlp.inference.loading import load_model
    from mtnlp.inference.submission import check_cards_fit

    model, tokenizer = load_model(args.model)
    cards = load_cards(args.cards or [model_cards(args.model)], _task_list(args.tasks))
    check_custom_metrics(cards, args.allow_custom_metrics)
    check_cards_fit(cards, args.model, model.config)
    accelerator = Accelerator()
    data_dirs = [Path(folder) for folder in args.data_dir] if args.data_dir else None
    if args.split:
        cards = cards_for_split(cards, args.split, data_dirs)
    loaders = {}
    for card in cards:
        task = load_task(
            card, tokenizer, data_dirs, train=False, max_eval_samples=args.max_eval_samples
        )
        loaders[card.name] = {
            split: accelerator.prepare(
                make_dataloader(card, dataset, tokenizer, args.batch_size, shuffle=False)
            )
            for split, dataset in task.evals.items()
        }
    model = accelerator.prepare(model)
    results = evaluate(model, loaders, {card.name: card for card in cards}, accelerator)
    if accelerator.is_main_process:
        print(json.dumps(results, indent=2))


def predict_command(args: argparse.Namespace) -> None:
    """`mtnlp predict`: one JSON line out (task -> prediction, after the row's other keys) per
    row in; or, with `--split`, one prediction file per task of the model's cards."""
    check_predict_flags(args)
    if args.split:
        predict_split_command(args)
        return
    from mtnlp.inference.rows import RowPredictor, chunks, input_format, read_rows

    source = args.input or "-"
    where = "stdin" if source == "-" else source
    try:
        file = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    except OSError as error:
        raise UserError(f"--input: {source}: {error.strerror}") from None
    with file:
        predict = RowPredictor(pipeline_of(args), _task_list(args.tasks), where)
        rows = read_rows(file, where, input_format(source, args.format))
        for chunk in chunks(rows, args.batch_size):
            for result in predict(chunk):
                print(json.dumps(result, ensure_ascii=False))
            sys.stdout.flush()


def check_predict_flags(args: argparse.Namespace) -> None:
    """`--split` reads the cards' data (`--data-dir`, `--cards`) into `--output-dir`; rows are
    read from `--input` (`--format`). Mixing the two is a mistake."""
    split_only = {
        "--data-dir": args.data_dir,
        "--cards": args.cards,
        "--output-dir": args.output_dir,
    }
    if args.split:
        for flag, value in {"--input": args.input, "--format": args.format}.items():
            if value is not None:
                raise UserError(f"{flag}: not with --split (which reads the cards' data)")
        return
    for flag, value in split_only.items():
        if value is not None:
            raise UserError(f"{flag}: only with --split")


def pipeline_of(args: argparse.Namespace) -> MultiTaskPipeline:
    """The pipeline of `--model` with `--device`, `--dtype` and `--batch-size`; with
    `--backend onnx`, of its ONNX graph (`--onnx-file`) on ONNX Runtime."""
    from mtnlp.inference.loading import load_model
    from mtnlp.inference.pipeline import MultiTaskPipeline, resolve_dtype

    if args.backend == "onnx":
        for flag, value in {"--device": args.device, "--dtype": args.dtype}.items():
            if value is not None:
                raise UserError(f"{flag}: not with --backend onnx (a graph runs on the CPU)")
        file = {"file": args.onnx_file} if args.onnx_file else {}
        return MultiTaskPipeline.from_onnx(args.model, batch_size=args.batch_size, **file)
    if args.onnx_file:
        raise UserError("--onnx-file: only with --backend onnx")
    model, tokenizer = load_model(args.model)
    dtype = resolve_dtype(args.dtype)
    if dtype is not None:  # in place (the pipeline would convert a copy): the model is ours
        model.to(dtype=dtype)
    return MultiTaskPipeline(model, tokenizer, device=args.device, batch_size=args.batch_size)


def predict_split_command(args: argparse.Namespace) -> None:
    """`mtnlp predict MODEL --split test`: a split of the model's cards into prediction files."""
    from mtnlp.artifacts.run_folder import model_cards
    from mtnlp.cards.load import load_cards
    from mtnlp.inference.submission import check_cards_fit, predict_split
    from mtnlp.utils.files import output_lock

    pipeline = pipeline_of(args)
    # the main tasks by default, as the pipeline answers; an auxiliary task when named
    tasks = _task_list(args.tasks) or (
        None if args.cards else pipeline.model.config.main_task_names
    )
    cards = load_cards(args.cards or [model_cards(args.model)], tasks)
    check_cards_fit(cards, args.model, pipeline.model.config)
    data_dirs = [Path(folder) for folder in args.data_dir] if args.data_dir else None
    output_dir = Path(args.output_dir or "predictions")
    with output_lock(output_dir):  # one writer per folder, as for training
        for path, rows in predict_split(pipeline, cards, args.split, data_dirs, output_dir):
            print(f"{path}: {rows} predictions")


def cards_check_command(args: argparse.Namespace) -> None:
    """`mtnlp cards check`: exit 0, or exit 2 with one line per problem naming its file."""
    from mtnlp.cards.load import load_cards

    try:
        cards = load_cards(args.paths)
        if not cards:
            raise UserError(f"{', '.join(args.paths)}: no task cards (*.yaml) found")
        if args.data_dir:  # also open each card's files: columns, labels, a few rows
            from mtnlp.data.check import check_card_data

            check_card_data(cards, [Path(folder) for folder in args.data_dir])
    except UserError as error:
        for line in str(error).splitlines():
            print(line, file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    print(f"{len(cards)} card(s) OK: {', '.join(card.name for card in cards)}")


def push_command(args: argparse.Namespace) -> None:
    """`mtnlp push`: a trained model folder and its model card to the Hub (with `--onnx`, also
    its ONNX graphs: an `mtnlp export` folder's, or, without a folder, an fp32 export made now)."""
    import tempfile

    from mtnlp.hub.push import check_repo_id, push_to_hub

    if not Path(args.model).is_dir():
        raise UserError(f"{args.model}: no such model folder")
    with tempfile.TemporaryDirectory() as staging:
        onnx_dir = args.onnx
        if onnx_dir == "":  # --onnx alone
            from mtnlp.export.onnx import export_onnx

            check_repo_id(args.hub_model_id)  # before the export's work
            onnx_dir = export_onnx(args.model, Path(staging) / "onnx")
        commit = push_to_hub(
            args.model,
            args.hub_model_id,
            onnx_dir=onnx_dir,
            private=args.private or None,
            commit_message=args.commit_message,
            license=args.license,
            language=args.language,
        )
    print(commit.commit_url)


def export_command(args: argparse.Namespace) -> None:
    """`mtnlp export`: a trained model as one ONNX graph for all heads (--format onnx), as a plain
    transformers folder for one task (--format transformers --task T), or as the bare encoder
    (--format encoder)."""
    if not Path(args.model).is_dir():
        raise UserError(f"{args.model}: no such model folder")
    if args.format != "onnx" and (
        args.quantize or args.opset or args.data_dir or args.max_eval_samples
    ):
        raise UserError(
            "--quantize, --opset, --data-dir and --max-eval-samples apply to --format onnx only"
        )
    if args.format == "transformers" and not args.task:
        raise UserError("--format transformers exports one task: give it with --task")
    if args.format != "transformers" and args.task:
        raise UserError("--task applies to --format transformers only")
    if args.format == "onnx":
        from mtnlp.export.onnx import export_onnx

        export_onnx(
            args.model,
            args.output,
            quantize=args.quantize,
            opset=args.opset,
            data_dir=args.data_dir,
            max_eval_samples=args.max_eval_samples,
        )
    elif args.format == "transformers":
        from mtnlp.export.transformers import export_task

        export_task(args.model, args.output, args.task)
    else:
        from mtnlp.export.transformers import export_encoder

        export_encoder(args.model, args.output)
    print(f"exported {args.model} to {args.output} ({args.format})")


# ------------------------------------------------------------------------------ parser
class Parser(OneLineArgumentErrors, argparse.ArgumentParser):
    """argparse (its sub-command parsers too); a flag that does not parse is one `error:` line."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mtnlp", description="Multi-task fine-tuning of transformer encoders (MT-DNN style)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "train", add_help=False, help="train a multi-task model (flags: mtnlp train --help)"
    )

    evaluate = commands.add_parser(
        "evaluate",
        help="dev metrics of a trained model, as JSON",
        description=evaluate_command.__doc__,
    )
    evaluate.add_argument("model", help="trained model folder (or Hub id)")
    evaluate.add_argument(
        "--data-dir", nargs="+", help="read the cards' local files here (else the Hub)"
    )
    evaluate.add_argument("--tasks", help="comma-separated tasks to evaluate (default: all)")
    evaluate.add_argument("--cards", nargs="+", help="task cards (default: the model's cards/)")
    evaluate.add_argument(
        "--max-eval-samples", type=_positive, help="at most N dev examples per task"
    )
    evaluate.add_argument("--batch-size", type=_positive, default=64, help="evaluation batch size")
    evaluate.add_argument(
        "--split",
        help="score this labelled split (e.g. test; a card without it: its splits test_*) "
        "instead of the cards' dev splits",
    )
    evaluate.add_argument(
        "--allow-custom-metrics",
        action="store_true",
        help="let the cards name metrics that are not built in (evaluate Hub ids, metric scripts): "
        "evaluate.load downloads and runs them as code",
    )
    evaluate.set_defaults(run=evaluate_command)

    predict = commands.add_parser(
        "predict",
        help="predictions on JSON lines, CSV or TSV rows, or a split of the cards' data",
        description='Predictions for rows with {"text": ...} or {"text": ..., "text_pair": ...} '
        "or the columns the cards read (e.g. sentence1, sentence2): one JSON line out per row "
        "in, keyed by task after the row's other keys (such as id). Input N in errors is line N. "
        "With --split: the split of every card (the model's cards/), one "
        "index<TAB>prediction file per task (GLUE's submission format).",
    )
    predict.add_argument("model", help="trained model folder (or Hub id)")
    predict.add_argument("--tasks", help="comma-separated tasks (default: every task that fits)")
    predict.add_argument(
        "--input", help="JSON-lines, CSV or TSV file (by its extension), or - for stdin (default)"
    )
    predict.add_argument(
        "--format", choices=["jsonl", "csv", "tsv"], help="input format (default: by extension)"
    )
    predict.add_argument("--split", help="predict this split of the cards' data, e.g. test")
    predict.add_argument(
        "--data-dir", nargs="+", help="--split: read the cards' local files here (else the Hub)"
    )
    predict.add_argument("--cards", nargs="+", help="--split: task cards (default: the model's)")
    predict.add_argument(
        "--output-dir", help="--split: folder of the prediction files (default: predictions)"
    )
    predict.add_argument("--batch-size", type=_positive, default=32, help="inputs per batch")
    predict.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    predict.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="model precision")
    predict.add_argument(
        "--backend",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: the ONNX graph of an `mtnlp export` folder on ONNX Runtime, CPU "
        "(default: %(default)s)",
    )
    predict.add_argument(
        "--onnx-file",
        help="--backend onnx: the graph to run, e.g. model.int8.onnx (default: model.onnx)",
    )
    predict.set_defaults(run=predict_command)

    cards = commands.add_parser("cards", help="task-card tools")
    card_commands = cards.add_subparsers(dest="cards_command", required=True, metavar="COMMAND")
    check = card_commands.add_parser(
        "check", help="validate task cards", description=cards_check_command.__doc__
    )
    check.add_argument("paths", nargs="+", help="card files or folders of cards")
    check.add_argument(
        "--data-dir",
        nargs="+",
        help="also open each card's local files here and check columns, labels and a few rows",
    )
    check.set_defaults(run=cards_check_command)

    push = commands.add_parser(
        "push", help="push a model folder to the Hub", description=push_command.__doc__
    )
    push.add_argument("model", help="trained model folder (a training --output-dir)")
    push.add_argument("--hub-model-id", required=True, help="repository, e.g. your-name/glue-mt")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--commit-message", default="Upload mtnlp multi-task model")
    push.add_argument("--license", help="the card's license (a Hub id: apache-2.0, mit, ...)")
    push.add_argument("--language", nargs="+", help="the card's languages (ISO 639: en, de, ...)")
    push.add_argument(
        "--onnx",
        nargs="?",
        const="",
        metavar="EXPORT_DIR",
        help="also upload the ONNX graphs of this `mtnlp export` folder (e.g. with int8); "
        "without a folder, an fp32 export made now",
    )
    push.set_defaults(run=push_command)

    export = commands.add_parser(
        "export",
        help="export a trained model: ONNX (all heads, one graph), one task, or the encoder",
        description=export_command.__doc__,
    )
    export.add_argument("model", help="trained model folder")
    export.add_argument("output", help="folder to write (must not exist or be empty)")
    export.add_argument(
        "--format",
        choices=["onnx", "transformers", "encoder"],
        default="onnx",
        help="onnx: model.onnx with one output per task; transformers: a plain "
        "AutoModelFor... folder for --task; encoder: the bare encoder (default: %(default)s)",
    )
    export.add_argument("--task", help="--format transformers: the task to export")
    export.add_argument(
        "--quantize",
        choices=["int8"],
        help="also write model.int8.onnx (dynamic quantization, checked against fp32)",
    )
    export.add_argument("--opset", type=_positive, help="ONNX opset (default: 18)")
    export.add_argument(
        "--data-dir",
        nargs="+",
        help="--quantize: read the cards' dev data here to check int8 agreement (else the Hub)",
    )
    export.add_argument(
        "--max-eval-samples",
        type=_positive,
        help="--quantize: at most N dev examples per task in the int8 check (default: 2000)",
    )
    export.set_defaults(run=export_command)
    return parser


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # the training flags have their own parser
        train_command(argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
