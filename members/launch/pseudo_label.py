"""Pseudo-label distorted images with a fitted ensemble (`make pseudo-label EXPERIMENT=... SOURCE=...`).

    python -m members.launch.pseudo_label -c configs/demo.yaml --source generate [--levels 1,3] [--per-ref 0] [--continuous]
    python -m members.launch.pseudo_label -c configs/demo.yaml --source pairs.csv [--root DIR]
    python -m members.launch.pseudo_label -c configs/demo.yaml --source DIS_DIR --ref-dir REF_DIR

The teacher is the experiment's fitted ensemble, loaded through `Scorer.from_ensemble` (which verifies
the ensemble and its members). Sources (several may be given): `generate` makes distorted images of the
experiment's TRAINING references (train split only) with the demo generator's distortion families
(members.data.pseudo_generate) into `<out>/images/`; a CSV of pairs in any format `members.engine.score
--pairs` reads; a folder of distorted images with `--ref-dir` (names matched as there, PIPAL's included).
A pair that touches an image of the val, test or valid split (by path or content) is refused, with one
line per pair, before anything is scored: val always, test and valid unless `--allow-test-inputs`
(recorded, and said in the readme of any zip built from members trained on the labels).

Scores are written in chunks (`<out>/.chunks-<plan>/`, atomically), so a run killed at any point
continues from the chunks done and ends with the same `labels.csv` as an uninterrupted run; the
manifest `pseudo_labels.json` (members.contract.pseudo) is written last. Labels are mapped onto the
training labels' scale (members.launch.pseudo_scale). Train a member on them with
`data.pseudo_labels: <out>` and `data.pseudo_weight` (members.data.pseudo verifies them at its start).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from members.contract.cli import INTERRUPTED, hold_folder_lock, quiet_start, run_main

if __name__ == "__main__":
    quiet_start()  # before the slow imports below (torch)

import numpy as np
from tqdm import tqdm

from members.contract.atomic import atomic_write_text, sweep_temps
from members.contract.config import ConfigError
from members.contract.data_config import VALID, DataError
from members.contract.pseudo import IMAGES, KIND, LABELS, MANIFEST, ORIGINS, VERSION
from members.contract.schema import Experiment, load_experiment
from members.contract.stagefiles import (StageFileError, preds_csv, read_preds, read_stage_outputs, rebuild_ensemble,
                                         sha256_file, write_stage_outputs)
from members.data.hashing import image_hashes
from members.data.index import Pair, check_pairs, check_unique
from members.data.pseudo import classify_pairs, label_table, read_manifest, refuse, split_images
from members.data.pseudo_generate import FAMILIES, GenerateConfig, generate
from members.data.splits import LabelStats, read_split
from members.engine.inputs import ScorerError, as_device
from members.engine.score import PairsError, match_folders, output_names, read_pairs_file
from members.engine.scorer import Scorer
from members.launch.pseudo_scale import ScaleError, apply_label_scale, fit_label_scale, validation_scores

GENERATE = "generate"


def _given_pairs(sources: list[str], root: Path | None, ref_dir: Path | None) -> tuple[list[Pair], list[dict]]:
    """The pairs of the CSV and folder sources, named as `members.engine.score` names them."""
    pairs, records = [], []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            if ref_dir is None:
                raise PairsError(f"--source {source}: a folder of distorted images needs --ref-dir (its references)")
            found, listed = match_folders(path, ref_dir), None
            records.append({"kind": "folder", "dis_dir": str(path), "ref_dir": str(ref_dir)})
        else:
            found, listed = read_pairs_file(path, root)
            records.append({"kind": "pairs", "path": str(path), "sha256": sha256_file(path)})
        names = output_names(found, listed)
        for i, ((dis, ref), name) in enumerate(zip(found, names)):
            ref_id = name[:5] if len(name) > 5 and name[5] == "_" else Path(ref).as_posix()  # PIPAL's rule, else the path
            pairs.append(Pair(name, Path(dis), Path(ref), ref_id, None, f"{source} pair {i + 1}"))
    return pairs, records


def _plan(ensemble_sha: str, pairs: list[Pair], hashes: dict, chunk: int, batch_size: int, device: str) -> str:
    """What the chunks' scores depend on: the teacher, every pair's images and the way they are scored."""
    rows = [[p.name, str(p.dis), str(p.ref), hashes[str(p.dis)], hashes[str(p.ref)]] for p in pairs]
    data = {"ensemble": ensemble_sha, "pairs": rows, "chunk": chunk, "batch_size": batch_size, "device": device}
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def _chunk_scores(path: Path, names: list[str]) -> np.ndarray | None:
    """A finished chunk's scores in `names` order, or None when it is absent or not this chunk's."""
    try:
        scores = read_preds(path) if path.is_file() else None
    except StageFileError:
        return None
    if scores is None or sorted(scores) != sorted(names):
        return None
    return np.array([scores[n] for n in names])


def score_in_chunks(scorer: Scorer, pairs: list[Pair], folder: Path, chunk: int, batch_size: int) -> tuple[np.ndarray, int]:
    """Ensemble scores of `pairs` (in order), chunk by chunk; chunks already in `folder` are reused. Returns
    the scores and the number of pairs scored by this run."""
    folder.mkdir(parents=True, exist_ok=True)
    sweep_temps(folder)
    scores, scored = [], 0
    with tqdm(total=len(pairs), desc="pseudo-labelling", unit="pair", file=sys.stderr) as bar:
        for k, start in enumerate(range(0, len(pairs), chunk)):
            part = pairs[start:start + chunk]
            names, path = [p.name for p in part], folder / f"{k:06d}.csv"
            done = _chunk_scores(path, names)
            if done is None:
                done = scorer.score_pairs([(p.dis, p.ref) for p in part], batch_size=batch_size)
                atomic_write_text(path, preds_csv(list(zip(names, done.tolist())), exact=True))
                scored += len(part)
            scores.append(done)
            bar.update(len(part))
    return np.concatenate(scores), scored


def _up_to_date(out: Path, plan: str) -> bool:
    """Whether `out` holds a complete, intact label table of this very plan."""
    try:
        return read_manifest(out / MANIFEST).get("scoring", {}).get("plan") == plan
    except (StageFileError, OSError):
        return False


def _splits(exp: Experiment) -> dict[str, list[Pair]]:
    lists = {s: exp.split_dir / f"{s}.csv" for s in ("train", "val", "test", VALID)}
    missing = [str(p) for s, p in lists.items() if s != VALID and not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: not found; the teacher's split lists come from make train-members "
                        f"EXPERIMENT={exp.path}")
    return {s: read_split(p) for s, p in lists.items() if p.is_file()}


def pseudo_label(exp: Experiment, args: argparse.Namespace, command: str) -> Path:
    """Make (or finish, or keep) the label table of `args` in its folder; returns the manifest's path."""
    out = Path(args.out) if args.out else exp.runs_dir / "pseudo_labels"
    read_stage_outputs(exp.out_dir, "ensemble.json", ["preds_test.csv"], rebuild_ensemble(exp.path))  # before any work
    hold_folder_lock(out, f"pseudo-labelling with {exp.path}")
    sweep_temps(out)
    sweep_temps(out / IMAGES)
    splits = _splits(exp)
    given = [s for s in args.source if s != GENERATE]
    pairs, sources = _given_pairs(given, Path(args.root) if args.root else None,
                                  Path(args.ref_dir) if args.ref_dir else None)
    generated: set[str] = set()
    if GENERATE in args.source:
        gen = GenerateConfig(tuple(args.families), tuple(args.levels), args.per_ref, args.seed, args.image_format,
                             args.continuous)
        made = generate(splits["train"], gen, out / IMAGES)
        generated = {p.name for p in made}
        pairs += made
        sources.append({"kind": GENERATE, **gen.record(), "references": len({p.ref_id for p in made})})
    elif (out / IMAGES).is_dir():
        shutil.rmtree(out / IMAGES)  # images of an earlier generating run: not in this table
    if not pairs:
        raise PairsError("no pairs to pseudo-label")
    check_unique(pairs, "the pairs to pseudo-label")
    hashes = image_hashes(sorted({p for pair in pairs for p in (pair.dis, pair.ref)}, key=str), out)
    origins, refused = classify_pairs(pairs, hashes, split_images(splits, exp.split_dir), args.allow_test_inputs,
                                      generated)
    if refused and args.skip_refused:
        print(f"leaving out {len(refused)} pair(s) that touch validation/test images (--skip-refused), e.g.\n  "
              + "\n  ".join(refused[:3]), file=sys.stderr)
        pairs = [p for p in pairs if p.name in origins]
    else:
        refuse(refused, "pseudo-label inputs", f"compared with the split lists in {exp.split_dir}; leave them "
               "out (or --skip-refused)")
    crop = max((m.config.model.crop for m in exp.members if not m.config.data.upscale_small), default=0)
    check_pairs(pairs, crop, False, "the pairs to pseudo-label")  # every file decodes and fits: before scoring

    scorer = Scorer.from_ensemble(exp.out_dir, device=args.device)
    record, ensemble_json = scorer.ensemble, exp.out_dir / "ensemble.json"
    member_scores, mos = validation_scores(exp.out_dir, record)
    rule = fit_label_scale(scorer.ensemble_of(member_scores), mos, record["calibration"]["kind"],
                           bool(record.get("higher_is_better", True)))
    order = sorted(pairs, key=lambda p: (str(p.ref), p.name))  # whole references per chunk where they fit
    ensemble_sha = sha256_file(ensemble_json)
    plan = _plan(ensemble_sha, order, hashes, args.chunk, args.batch_size, as_device(args.device).type)
    if _up_to_date(out, plan):
        print(f"{out / MANIFEST}: up to date (the same teacher, pairs and settings); nothing to do")
        return out / MANIFEST
    (out / MANIFEST).unlink(missing_ok=True)  # no manifest vouches for a table half rewritten
    chunks = out / f".chunks-{plan[:16]}"
    for old in out.glob(".chunks-*"):
        if old != chunks:
            shutil.rmtree(old, ignore_errors=True)  # of a killed run with other inputs or another teacher
    started = time.perf_counter()
    scores, scored = score_in_chunks(scorer, order, chunks, args.chunk, args.batch_size)
    seconds = time.perf_counter() - started
    labels = apply_label_scale(rule, scores)
    stats = LabelStats.load(exp.split_dir / "label_stats.json")
    counts = {"pairs": len(order), **{k: sum(1 for p in order if origins[p.name] == k) for k in ORIGINS}}
    manifest = {
        "kind": KIND, "version": VERSION, "command": command,
        "teacher": {"experiment": str(exp.path), "ensemble_json": str(ensemble_json), "ensemble_sha256": ensemble_sha,
                    "method": record.get("method"), "members": [m["name"] for m in record["members"]]},
        "label_scale": {**rule, "training_labels": {"min": stats.min, "max": stats.max,
                                                    "higher_is_better": stats.higher_is_better},
                        "labels_outside_training_range": int(np.sum((labels < stats.min) | (labels > stats.max)))},
        "sources": sources, "allow_test_inputs": bool(args.allow_test_inputs), "counts": counts,
        "test_inputs": sorted(p.name for p in order if origins[p.name] == "test_inputs"),
        "images": {str(p): hashes[str(p)] for pair in order for p in (pair.dis, pair.ref)},
        "scoring": {"plan": plan, "chunk": args.chunk, "batch_size": args.batch_size, "device": str(scorer.device),
                    "pairs_scored_this_run": scored, "seconds_this_run": round(seconds, 3)},
    }
    table = label_table([(p, float(lab), float(s)) for p, lab, s in zip(order, labels, scores)])
    write_stage_outputs(out, {LABELS: table}, MANIFEST, manifest)
    shutil.rmtree(chunks, ignore_errors=True)
    per_pair = f", {seconds / scored:.3f} s/pair" if scored else ""
    print(f"wrote {len(order)} pseudo-labels ({', '.join(f'{counts[k]} {k}' for k in ORIGINS if counts[k])}; "
          f"scored {scored} in {seconds:.1f} s{per_pair}) to {out / LABELS}, manifest {out / MANIFEST}; train a "
          f"member on them with data.pseudo_labels: {out}")
    return out / MANIFEST


def _levels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated level indices, e.g. 1,3") from None


def _families(text: str) -> list[str]:
    return list(FAMILIES) if text == "all" else [f.strip() for f in text.split(",") if f.strip()]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="members.launch.pseudo_label", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="the fitted experiment whose ensemble labels the pairs")
    parser.add_argument("--source", nargs="+", default=[GENERATE],
                        help="generate, a CSV of pairs, or a folder of distorted images (with --ref-dir); several allowed")
    parser.add_argument("--root", help="with a CSV source: the folder its relative paths start from")
    parser.add_argument("--ref-dir", help="with a folder source: the folder of its references")
    parser.add_argument("--families", type=_families, default=list(FAMILIES),
                        help=f"generate: distortion families, comma-separated or all ({', '.join(FAMILIES)})")
    parser.add_argument("--levels", type=_levels, default=[1, 3], help="generate: level indices 0-3 (default 1,3)")
    parser.add_argument("--per-ref", type=int, default=0, help="generate: images per reference (0: every family x level)")
    parser.add_argument("--continuous", action="store_true",
                        help="generate: --per-ref images per reference, the families in turn, at strengths drawn "
                             "between the lowest and highest of --levels (more pairs than the 28 fixed ones)")
    parser.add_argument("--seed", type=int, default=0, help="generate: seed of the noise and of --per-ref's draws")
    parser.add_argument("--image-format", default="png", help="generate: png or bmp")
    parser.add_argument("--out", help="output folder (default <runs_dir>/pseudo_labels)")
    parser.add_argument("--allow-test-inputs", action="store_true",
                        help="admit pairs that touch test or valid images (recorded; the readme says so); never val")
    parser.add_argument("--skip-refused", action="store_true",
                        help="leave out pairs that touch held-out images instead of stopping")
    parser.add_argument("--chunk", type=_positive, default=256, help="pairs per resumable chunk (default 256)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="distorted images per scoring step")
    parser.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an experiment key")
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.executable).name, "-m", "members.launch.pseudo_label",
                          *(sys.argv[1:] if argv is None else argv)])
    try:
        exp = load_experiment(args.config, args.set)
        pseudo_label(exp, args, command)
    except (ConfigError, DataError, StageFileError, PairsError, ScorerError, ScaleError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_main(main, INTERRUPTED)
