"""One table of mtnlp's settings and the peer baseline, from their JSON files.

    python -m bench.compare glue_quality.json peer.jsonl peer-grouped.jsonl
    python -m bench.compare glue_quality.json peer.jsonl --baseline "peer (Trainer)" --output t.md

Reads bench/glue_quality.py's JSON and bench/peer.py's JSON lines (an interrupted peer file too:
only the seeds that ran every task count) and prints a Markdown table: per setting, each task's
score and the average over the tasks as mean ± sd over seeds, the average's gain over the
baseline (by default the first peer setting), wall time and training examples per seed (wall
time: from reading the data to the dev scores, on both sides), examples per second, the time
against the baseline's, and peak memory. Scores are recomputed from the runs, by the same
function on both sides (bench/glue_quality.py's `summarize`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import CONLL_CARDS, GLUE_CARDS, score_names
from bench.glue_quality import summarize


def read_runs(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """A file's runs and the machine it ran on: glue_quality's one JSON object, or peer.py's JSON
    lines (header, runs, summary)."""
    text = path.read_text(encoding="utf-8")
    try:
        records = [json.loads(text)]
    except json.JSONDecodeError:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    runs = [run for record in records for run in record.get("runs", [record]) if "setting" in run]
    machine = next((record["machine"] for record in records if "machine" in record), None)
    return runs, machine


def complete_seeds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the (setting, seed) pairs that scored every task of their setting: an
    interrupted file's last seed would otherwise be averaged over fewer tasks."""
    tasks: dict[str, set[str]] = {}
    covered: dict[tuple[str, int], set[str]] = {}
    for run in runs:
        tasks.setdefault(run["setting"], set()).update(run["metrics"])
        covered.setdefault((run["setting"], run["seed"]), set()).update(run["metrics"])
    kept = [run for run in runs if covered[run["setting"], run["seed"]] == tasks[run["setting"]]]
    dropped = sorted({f"{run['setting']} seed {run['seed']}" for run in runs} - {
        f"{run['setting']} seed {run['seed']}" for run in kept
    })  # fmt: skip
    if dropped:
        print(f"left out (not every task ran): {', '.join(dropped)}", file=sys.stderr)
    return kept


def summaries(paths: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per (file, setting): its label, tasks and summary; and the tasks in order."""
    from mtnlp import load_cards

    rows: list[dict[str, Any]] = []
    order: list[str] = []
    for path in paths:
        runs, machine = read_runs(path)
        runs = complete_seeds(runs)
        tasks = list(dict.fromkeys(task for run in runs for task in run["metrics"]))
        order += [task for task in tasks if task not in order]
        cards = load_cards([GLUE_CARDS, CONLL_CARDS], tasks)
        summary = summarize(runs, {card.name: score_names(card) for card in cards})
        for setting, figures in summary["settings"].items():
            rows.append({"setting": setting, "file": path, "machine": machine, **figures})
    labels = [row["setting"] for row in rows]
    for row in rows:  # the same setting from two files: say which file
        if labels.count(row["setting"]) > 1:
            row["setting"] = f"{row['setting']} ({row['file'].name})"
    return rows, order


def mean_sd(figures: dict[str, float] | None) -> str:
    return "–" if figures is None else f"{figures['mean']:.1f} ± {figures['std']:.1f}"


def table(rows: list[dict[str, Any]], tasks: list[str], baseline: str | None) -> str:
    """The Markdown table; the gain and time ratio columns when a baseline row exists."""
    base = next(
        (row for row in rows if row["setting"] == baseline)
        if baseline
        else (row for row in rows if row["setting"].startswith("peer")),
        None,
    )
    if baseline and base is None:
        known = ", ".join(row["setting"] for row in rows)
        raise SystemExit(f"--baseline {baseline!r}: no such setting ({known})")
    head = ["setting", *tasks, "average"]
    head += ["Δ average", "wall s / seed", "× time"] if base else ["wall s / seed"]
    head += ["examples / seed", "examples/s", "peak RSS MB", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["setting"], *(mean_sd(row["tasks"].get(task)) for task in tasks)]
        cells.append(mean_sd(row["glue_average"]))
        wall = f"{row['wall_seconds']:.0f}"
        if base:
            gain = row["glue_average"]["mean"] - base["glue_average"]["mean"]
            cells += [f"{gain:+.1f}", wall, f"{row['wall_seconds'] / base['wall_seconds']:.2f}"]
        else:
            cells.append(wall)
        cells += [
            f"{row['train_examples']:.0f}",
            f"{row['train_examples'] / row['wall_seconds']:.1f}",
            f"{row['peak_rss_mb_train']:.0f}",
            str(row["glue_average"]["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sources(rows: list[dict[str, Any]]) -> str:
    """Where each file's numbers come from: date, commit, CPU, threads."""
    seen: dict[Path, str] = {}
    for row in rows:
        machine = row["machine"] or {}
        seen[row["file"]] = (
            f"- `{row['file'].name}`: {machine.get('date', '?')}, commit "
            f"{machine.get('commit', '?')}, {machine.get('cpu', '?')}, "
            f"{machine.get('torch_threads', '?')} torch threads"
        )
    return "\n".join(seen.values())


def main(argv: list[str] | None = None) -> str:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("files", type=Path, nargs="+", help="glue_quality JSON, peer JSON lines")
    cli.add_argument("--baseline", help="the setting the gains and times are against")
    cli.add_argument("--output", type=Path, help="also write the table to this file")
    options = cli.parse_args(argv)
    rows, tasks = summaries(options.files)
    text = f"{table(rows, tasks, options.baseline)}\n\n{sources(rows)}\n"
    print(text, end="")
    if options.output is not None:
        options.output.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
