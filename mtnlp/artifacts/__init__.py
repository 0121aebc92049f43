"""The run folder: what a training run writes (`run_folder`: one owner for every file name) and
its report (`report`, `affinity`: plots and report.md)."""
