r"""POS tagging, chunking and NER on CoNLL-2003 with one shared encoder, in one of three layouts.

    accelerate launch recipes/conll_hierarchical.py --layout jmt --model bert-base-cased
    accelerate launch --cpu recipes/conll_hierarchical.py --layout low --model tiny \
        --data-dir ../shared/data/conll2003 --max-steps 50 --output-dir outputs/conll_low

Layouts (the tasks in order, POS -> chunk -> NER by default):
  flat  every head reads the encoder's last layer (MT-DNN, jiant).
  low   low supervision (Søgaard & Goldberg 2016): task i of n reads encoder layer
        round(i * L / n) of L, so POS reads L/3, chunking 2L/3, NER the top layer.
  jmt   joint many-task layering (Hashimoto et al. 2017): the same layers, and every task has its
        own task layer (--task-layer) stacked on the one below, fed with its label embeddings;
        successive regularization (--successive-reg, 0 = off) pulls shared parameters toward their
        values after the lower task's last update.
        As in Hashimoto et al. 2017, jmt also defaults to --sampler ordered (each epoch trains
        POS, then chunking, then NER), --clip-by-depth (clipping at --max-grad-norm x min(3,
        depth)) and --head-learning-rate 1e-3 (task layers, label embeddings and heads; the
        encoder keeps --learning-rate). Flags or --config values given by the user win.

Recipe flags: --layout flat|low|jmt (default flat), --task-layer bilstm|transformer (jmt; default
bilstm), --successive-reg DELTA (jmt; default 0.01). Every other flag is a common training flag
(see --help). Dev metrics per task go to OUTPUT_DIR/eval_results.json.
"""

import argparse
from pathlib import Path

from transformers import AutoConfig

from mtnlp import TaskCard, load_cards, parse_args, train
from mtnlp.cards import check_hierarchy
from mtnlp.modeling.tiny import TINY_LAYERS
from mtnlp.utils.errors import exit_on_user_error

CONLL_CARDS = Path(__file__).resolve().parent.parent / "tasks" / "conll2003"
TASKS = "pos,chunk,ner"  # bottom to top
LAYOUTS = ("flat", "low", "jmt")


def layout_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="flat",
        help="flat: every head on the top layer; low: low supervision; jmt: joint many-task",
    )
    parser.add_argument(
        "--task-layer",
        choices=("bilstm", "transformer"),
        default="bilstm",
        help="jmt: the task layer stacked under each head",
    )
    parser.add_argument(
        "--successive-reg",
        type=float,
        default=0.01,
        help="jmt: successive regularization strength (0 = off)",
    )
    return parser


def encoder_depth(model: str) -> int:
    """Number of transformer layers of `--model` ('tiny': the tiny test BERT's)."""
    if model == "tiny":
        return TINY_LAYERS
    return AutoConfig.from_pretrained(model).num_hidden_layers


def apply_layout(
    cards: list[TaskCard],
    layout: str,
    num_layers: int,
    task_layer: str = "bilstm",
    successive_reg: float = 0.01,
) -> list[TaskCard]:
    """The cards (bottom task first) rewired for `layout` on an encoder of `num_layers` layers."""
    count = len(cards)
    # low/jmt: task i of n reads layer round(i * L / n) (at least 1); the top task the last layer
    layers = [max(1, round((i + 1) * num_layers / count)) for i in range(count - 1)] + [-1]
    laid_out = []
    for index, card in enumerate(cards):
        fields: dict = {"layer": -1, "stack_on": None, "task_layer": None}
        fields["successive_regularization"] = 0.0
        if layout in ("low", "jmt"):
            fields["layer"] = layers[index]
        if layout == "jmt":
            fields["task_layer"] = {"type": task_layer}
            if index > 0:
                fields["stack_on"] = cards[index - 1].name
                fields["successive_regularization"] = successive_reg
        laid_out.append(card.replace(**fields))
    return check_hierarchy(laid_out)


def layout_defaults(layout: str) -> dict:
    """The training defaults of `layout`: jmt's follow what made JMT work (Hashimoto et al.
    2017, Sec. 4): tasks trained low to high within each epoch, clipping by depth, and new
    layers at a higher learning rate than the pretrained encoder."""
    defaults = {"output_dir": f"outputs/conll_{layout}", "tasks": TASKS}
    if layout == "jmt":
        defaults |= {"sampler": "ordered", "clip_by_depth": True, "head_learning_rate": 1e-3}
    return defaults


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    recipe, rest = layout_parser().parse_known_args(argv)
    args = parse_args(
        rest,
        defaults=layout_defaults(recipe.layout),
        description=__doc__.split("\n\n")[0]
        + " Recipe flags: --layout flat|low|jmt, --task-layer bilstm|transformer, "
        "--successive-reg DELTA.",
    )
    cards = load_cards(args.cards or [CONLL_CARDS], args.task_list)
    cards = apply_layout(
        cards, recipe.layout, encoder_depth(args.model), recipe.task_layer, recipe.successive_reg
    )
    return train(args, cards)


if __name__ == "__main__":
    main()
