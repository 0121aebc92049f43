r"""Multi-task fine-tuning on GLUE, MT-DNN style: one shared encoder, one head per task.

    accelerate launch recipes/glue_mt.py --model bert-base-uncased --tasks rte,mrpc,stsb
    accelerate launch --cpu recipes/glue_mt.py --model tiny --data-dir ../shared/data/glue \
        --tasks rte,mrpc --max-steps 50 --output-dir outputs/smoke
    # MT-DNN's two stages; temperature sampling, learned (uncertainty) loss weights
    accelerate launch recipes/glue_mt.py --model bert-base-uncased --tasks rte,mrpc,stsb,cola \
        --sampler temperature --weighting uncertainty --finetune-each --finetune-epochs 3

Without `--data-dir` the cards read GLUE from the Hub; with it, the classic GLUE folder layout
(`RTE/train.tsv`, ...). See `--help` for every flag.
"""

from pathlib import Path

from mtnlp import parse_args, run
from mtnlp.utils.errors import exit_on_user_error

GLUE_CARDS = Path(__file__).resolve().parent.parent / "tasks" / "glue"


@exit_on_user_error
def main() -> None:
    args = parse_args(
        defaults={"output_dir": "outputs/glue_mt"},
        description="Multi-task fine-tuning on the GLUE task cards in tasks/glue.",
    )
    run(args, default_cards=[GLUE_CARDS])


if __name__ == "__main__":
    main()
