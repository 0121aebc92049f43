"""Bad JMT training options (issue 21, item 4): `--clip-by-depth` without a clipping norm, its
value in a config file, and a misspelled `--sampler ordered`. Each case runs `mtnlp train`
in-process on a copy of the tiny tasks: exit 2, one `error:` line naming the flag or the file
and key, no traceback, no output folder left behind."""

from __future__ import annotations

import pytest
from test_bad_input import (
    Case,
    prepare,
    tiny_tasks,  # noqa: F401  (a fixture)
    train_errors,
    write,
)

NEEDS_NORM = "--clip-by-depth: needs --max-grad-norm > 0 (0 turns clipping off)"
SAMPLERS = (
    "annealed, ordered, proportional, round_robin, sequential, specified, temperature, uniform"
)

CASES = [
    Case("clip-by-depth-without-norm", lambda case: None, NEEDS_NORM,
         ("--clip-by-depth", "--max-grad-norm", "0")),
    Case("clip-by-depth-config-without-norm",
         write("run.yaml", "clip_by_depth: true\nmax_grad_norm: 0\n"), NEEDS_NORM,
         ("--config", "{case}/run.yaml")),
    Case("clip-by-depth-config-not-a-bool", write("run.yaml", "clip_by_depth: maybe\n"),
         "{case}/run.yaml: clip_by_depth: expected true or false, got 'maybe'",
         ("--config", "{case}/run.yaml")),
    Case("clip-by-depth-with-a-value", lambda case: None,
         "mtnlp train: argument --clip-by-depth/--clip_by_depth: ignored explicit argument "
         "'yes' (see mtnlp train --help)", ("--clip-by-depth=yes",)),
    Case("sampler-ordered-misspelled", lambda case: None,
         f"--sampler: unknown sampler 'order'; known: {SAMPLERS}", ("--sampler", "order")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_jmt_option_exits_2_with_one_error_line(
    case,
    tiny_tasks,  # noqa: F811  (the fixture imported from test_bad_input)
    tmp_path,
    capsys,
):
    flags, expected = prepare(case, tiny_tasks, tmp_path)
    assert train_errors(flags, tmp_path / "out", capsys) == [expected]


def test_jmt_table_is_complete():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) == 5
