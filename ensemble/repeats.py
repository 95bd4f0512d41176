"""`python -m ensemble.evaluate -c EXP --repeats K`: the IQA-paper protocol, mean ± std over K random
reference-disjoint splits.

`make evaluate EXPERIMENT=EXP REPEATS=K` trains, predicts and fits repeat k (k < K) into
`<runs_dir>/repeat_<k>/` with `--set runs_dir=<runs_dir>/repeat_<k> --set members.data.split_seed=<k>`;
this module only reads those folders (as `ensemble.evaluate` reads one experiment: verified member,
label and ensemble files) and writes `<runs_dir>/evaluation_repeats.md` and `.json`. It refuses a
missing or stale repeat (naming the make command that makes it) and repeats that share a split seed or
a test list: their mean would count one split twice.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from members.contract.schema import Experiment, load_experiment
from members.contract.stagefiles import make_command, sha256_file

from .scored import METRICS, gather, point_metrics, table, write_report


def repeats_command(args: argparse.Namespace) -> str:
    """The make command that (re)makes every repeat of this evaluation, runnable as printed."""
    sets = " ".join(f"--set {o}" for o in args.overrides)
    command = f"{make_command('evaluate', args.config)} REPEATS={args.repeats}"
    return command + (f" ARGS={shlex.quote(sets)}" if sets else "")


def check_repeatable(exp: Experiment, args: argparse.Namespace) -> None:
    """Refuse, before anything is trained, what --repeats cannot average."""
    if args.repeats < 2:
        raise ValueError(f"--repeats {args.repeats}: needs at least 2 repeats (without REPEATS, make evaluate "
                         "evaluates the experiment itself)")
    if args.labels is not None or args.split != "test":
        raise ValueError("--repeats evaluates each repeat's own labelled test split; drop --labels and --split")
    fixed = [m.name for m in exp.members if m.config.data.format != "csv"]
    if fixed:
        raise ValueError(f"--repeats needs random reference-disjoint test splits (data.format: csv); the test split "
                         f"of {', '.join(fixed)} is the data's fixed test folder, the same in every repeat")
    if exp.ensemble.out_dir:
        raise ValueError(f"--repeats: ensemble.out_dir {exp.ensemble.out_dir} would be shared by every repeat; "
                         "unset it (each repeat's ensemble goes to <runs_dir>/repeat_<k>/ensemble)")


def repeat_experiment(args: argparse.Namespace, runs_dir: Path, k: int) -> Experiment:
    return load_experiment(args.config, [*args.overrides, f"runs_dir={runs_dir / f'repeat_{k}'}",
                                         f"members.data.split_seed={k}"])


def _split_seed(exp: Experiment) -> object:
    """The split seed the repeat's split lists were made with, as their splits.json records it."""
    try:
        return json.loads((exp.split_dir / "splits.json").read_text(encoding="utf-8"))["data"].get("split_seed", 0)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _check_distinct(exps: list[Experiment], values: list[object], what: str) -> None:
    seen: dict[object, int] = {}
    for k, value in enumerate(values):
        if value in seen:
            raise ValueError(f"repeats {seen[value]} and {k} ({exps[seen[value]].runs_dir}, {exps[k].runs_dir}) "
                             f"share {what}: one split would count twice; remove {exps[k].runs_dir} and rerun "
                             "make evaluate with REPEATS")
        seen[value] = k


def markdown(exp: Experiment, summary: dict[str, dict], k: int, n_images: list[int]) -> str:
    lines = [f"# Evaluation over {k} random reference-disjoint splits: {exp.path}", "",
             f"Mean ± std (sample, ddof 1) over repeats of the test split; repeat k splits with data.split_seed k "
             f"({min(n_images)}-{max(n_images)} test images per repeat). Correlations keep their sign; "
             "main = PLCC + SRCC.", "",
             *table(summary, lambda v: f"{v['mean']:.4f} ± {v['std']:.4f}")]
    return "\n".join(lines) + "\n"


def summarise(args: argparse.Namespace, exp: Experiment) -> int:
    """Read every repeat, refuse missing or duplicate ones, write and print the mean ± std table."""
    exps = [repeat_experiment(args, exp.runs_dir, k) for k in range(args.repeats)]
    missing = [str(e.runs_dir) for e in exps if not e.runs_dir.is_dir()]
    if missing:
        raise ValueError(f"{len(missing)} of {args.repeats} repeats missing ({', '.join(missing)}); run "
                         f"{repeats_command(args)} (it reuses the repeats already made)")
    _check_distinct(exps, [_split_seed(e) for e in exps], "a split seed")
    _check_distinct(exps, [sha256_file(e.split_dir / "test.csv") if (e.split_dir / "test.csv").is_file() else e.runs_dir
                           for e in exps], "an identical test list")
    per_repeat = []
    for k, e in enumerate(exps):
        try:
            scored = gather(e, "test", None)
        except ValueError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"repeat {k} in {e.runs_dir} is incomplete or stale ({first}); run "
                             f"{repeats_command(args)} to remake it") from None
        per_repeat.append((scored, point_metrics(scored)))
    summary = {row: {key: {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)), "values": vals}
                     for key in METRICS
                     for vals in [[values[row][key] for _, values in per_repeat]]}
               for row in per_repeat[0][1]}
    n_images = [len(s.names) for s, _ in per_repeat]
    text = markdown(exp, summary, args.repeats, n_images)
    record = {"experiment": str(exp.path), "repeats": args.repeats, "split_seeds": list(range(args.repeats)),
              "runs_dirs": [str(e.runs_dir) for e in exps], "n_images": n_images,
              "n_refs": [int(len(np.unique(s.refs))) for s, _ in per_repeat], "rows": summary}
    paths = write_report(exp.runs_dir, "evaluation_repeats", text, record)
    sys.stdout.write(text + f"wrote {paths[0]} and {paths[1]}\n")
    return 0
