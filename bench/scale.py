"""`make scale`: the kit's own costs at PIPAL's real size, measured on this machine.

    python -m bench.scale [--data data/scale] [--runs runs/scale] [--out bench] [--before bench/scale_before.json]

What it runs (each command in its own process, as a user runs it; every Python process of a command
counts its sha256 bytes, `sha256_file` calls, peak RSS and time inside `Accelerator.accumulate`
through bench/scale_hooks/sitecustomize.py, which is on PYTHONPATH for these commands only):
1. `bench.scale_tree`: the PIPAL-size tree (23,200 + 1,650 + 1,650 distorted 288x288 BMPs, hard
   links), kept between runs.
2. The data check of one member on the full lists (`members.data.splits.prepare_member_data`), the
   first time (fresh split folder: every image hashed and decoded) and the second time.
3. `members.launch.experiment` on 6 members over the full lists until it starts the first trainer
   (then Ctrl-C): what every `make train-members` spends before training at the real size.
4. `bench.scale_costs`: state sizes of configs/ahiq_c.yaml's real models; the step and per-crop costs
   of ViT-B/8 + ResNet-50 (random weights, fp32) for the validation share.
5. `make train-members` (`members.launch.experiment`, output redirected to a file as when members run side
   by side) on 2 members of bench/scale/member.yaml training on `Train_Label_sample` (6 images per
   reference: 240 steps per epoch; validation holds out 40 references as PIPAL's), 3 epochs, one view,
   then predicting the real validation and test folders. The loop's step times come from watching each
   member's log.csv grow (a row every train.log_every steps, the shipped 50), the model's share of them
   from the trainer's own record of its `accumulate` blocks. Then
   `python -m ensemble` and `python -m submission` (test and valid phases).
6. `training_step` on preloaded batches in a fresh process with the trainer's threads (a reference).
7. `make train-members` again on the finished members (a rerun: what it hashes).
`bench.scale_report` turns the measurements into bench/scale.md and bench/scale.json, goals included,
with a `before` column from --before when given. bench/scale.md says what is extrapolated and how.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bench import scale_tree
from bench.scale_report import analyse, write_report
from members.contract.atomic import atomic_write_text
from members.contract.data_config import VALID

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HOOKS = BENCH / "scale_hooks"
MEMBER = BENCH / "scale" / "member.yaml"


@dataclass
class Options:
    data: Path
    runs: Path
    out: Path
    before: Path | None
    distinct: int = 4
    sample: int = 6  # images per training reference in Train_Label_sample (240 steps per epoch)
    members: int = 2  # trained and predicted
    full_members: int = 6  # in the start-up run over the full lists
    cpu_procs: int = 1
    compute_steps: int = 30
    step_costs: bool = True
    timeout: int = 7200
    shape: scale_tree.Shape = scale_tree.PIPAL
    costs_experiment: str = "configs/ahiq_c.yaml"  # whose models' states are counted
    member_extra: dict[str, dict] = field(default_factory=dict)  # sections merged into the members (tests)


def say(text: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {text}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def child_env(stats: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a measured command: the counting hooks first on PYTHONPATH, then the repository."""
    path = [str(HOOKS), str(REPO), *filter(None, [os.environ.get("PYTHONPATH", "")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "AHIQ_SCALE_STATS": str(stats), **(extra or {})}


def read_stats(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    return records


class Command:
    """One measured command: its wall time, status, output and the per-process records of the hooks."""

    def __init__(self, opts: Options, name: str, args: list[str], env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.name, self.args, self.log = name, [sys.executable, *args], log
        self.stats = opts.runs / "stats" / name
        shutil.rmtree(self.stats, ignore_errors=True)
        self.stats.mkdir(parents=True)
        self.env = child_env(self.stats, env)
        self.timeout = opts.timeout

    def shown(self) -> str:
        return " ".join(self.args[1:])

    def run(self) -> dict:
        say(f"{self.name}: {self.shown()}")
        load_before, started = load(), time.perf_counter()
        out = open(self.log, "w", encoding="utf-8") if self.log else subprocess.PIPE
        try:
            proc = subprocess.run(self.args, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                  text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"error: {self.name} took longer than {self.timeout} s (--timeout)") from None
        finally:
            if self.log:
                out.close()
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log else proc.stdout
        if proc.returncode != 0:
            raise SystemExit(f"error: {self.name} failed (exit {proc.returncode}):\n{text[-3000:]}")
        return self.result(time.perf_counter() - started, load_before, text)

    def result(self, wall: float, load_before: list[float], text: str) -> dict:
        return {"name": self.name, "wall_s": round(wall, 2), "load": [load_before, load()],
                "records": read_stats(self.stats), "output": text}


def last_json(text: str) -> dict:
    return json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])


class Tail(threading.Thread):
    """Records when each line of some growing files appears (the member's log.csv, the driver's log)."""

    def __init__(self, paths: list[Path], every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.paths, self.every = paths, every
        self.lines: dict[str, list[tuple[float, str]]] = {str(p): [] for p in paths}
        self.done = threading.Event()

    def run(self) -> None:
        offsets, partial = {str(p): 0 for p in self.paths}, {str(p): "" for p in self.paths}
        while True:
            stop = self.done.is_set()
            for path in self.paths:
                key = str(path)
                try:
                    with open(path, encoding="utf-8", errors="replace") as f:
                        f.seek(offsets[key])
                        chunk = f.read()
                        offsets[key] = f.tell()
                except OSError:
                    continue
                now = time.perf_counter()
                *complete, partial[key] = (partial[key] + chunk).split("\n")
                self.lines[key] += [(now, line) for line in complete]
            if stop:
                return
            time.sleep(self.every)


def settle(marker: Path) -> None:
    """Wait until a tree built just now is older than filehash.RACY_SECONDS: the kit does not cache the
    hash of a file written that recently (a real PIPAL copy is old), and the second data check would
    hash every image again."""
    from members.contract.filehash import RACY_SECONDS

    wait = marker.stat().st_mtime + RACY_SECONDS + 0.5 - time.time()
    if wait > 0:
        time.sleep(wait)


def write_configs(opts: Options) -> dict[str, Path]:
    """The two experiments of the run, under <runs>/configs: `full` (the full lists) and `pipeline`
    (training on Train_Label_sample), their members built on bench/scale/member.yaml."""
    folder = opts.runs / "configs"
    data = opts.data.resolve()
    experiments = {"full": ("Train_Label", opts.full_members), "pipeline": (scale_tree.SAMPLE_LABELS, opts.members)}
    paths = {}
    val_refs = int(0.2 * opts.shape.train_refs + 0.5)  # the members' holdout (val_fraction 0.2)
    folds = max(2, min(5, val_refs - 1))  # grouped by reference, with an inner grouped CV left in each fold
    for kind, (labels, n) in experiments.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        members = []
        for k in range(1, n + 1):
            path = folder / kind / f"scale_s{k}.yaml"
            member = {"base": str(MEMBER), "name": f"scale_s{k}", "seed": k, **opts.member_extra}
            member["data"] = {**opts.member_extra.get("data", {}), "root": str(data), "train_labels": labels}
            path.write_text(yaml.safe_dump(member, sort_keys=False), encoding="utf-8")
            members.append(f"{kind}/{path.name}")
        paths[kind] = folder / f"{kind}.yaml"
        paths[kind].write_text(
            f"name: scale_{kind}\nruns_dir: {(opts.runs / kind).resolve()}\nmembers: {json.dumps(members)}\n"
            f"ensemble: {{folds: {folds}, n_boot: 200}}\nsubmission: {{test_dir: {data / 'NTIRE2022_FR_Testing_Dis'}}}\n",
            encoding="utf-8")
    return paths


def data_checks(opts: Options, config: Path) -> list[dict]:
    shutil.rmtree(opts.runs / "full", ignore_errors=True)
    runs = []
    for k in (1, 2):
        ran = Command(opts, f"data_check_{k}", ["-m", "bench.scale_children", "data-check", str(config)]).run()
        runs.append({**ran, **last_json(ran["output"])})
    return runs


def startup(opts: Options, config: Path) -> dict:
    """`make train-members` over the full lists until it starts the first member, then Ctrl-C."""
    cmd = Command(opts, "startup_full", ["-m", "members.launch.experiment", "-c", str(config),
                                         "--cpu-procs", str(opts.cpu_procs)])
    say(f"{cmd.name}: {cmd.shown()} (until the first member starts)")
    load_before, started = load(), time.perf_counter()
    proc = subprocess.Popen(cmd.args, cwd=REPO, env=cmd.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, first = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("member 1 of"):
            first = time.perf_counter() - started
            os.kill(proc.pid, signal.SIGINT)  # the driver stops its member and exits 130
            break
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        rest, _ = proc.communicate()
    text = "".join(lines) + (rest or "")
    if first is None:
        raise SystemExit(f"error: {cmd.name}: the driver never started a member (exit {proc.returncode}):\n{text[-3000:]}")
    return {**cmd.result(time.perf_counter() - started, load_before, text), "until_first_member_s": round(first, 2)}


def costs(opts: Options) -> dict:
    out = opts.runs / "costs.json"
    args = ["-m", "bench.scale_costs", "--out", str(out), "--also", str(MEMBER), "--experiment", opts.costs_experiment]
    args += [] if opts.step_costs else ["--no-step-costs"]
    ran = Command(opts, "real_costs", args).run()
    return {**ran, **json.loads(out.read_text(encoding="utf-8"))}


def state_folder_bytes(states: Path) -> int | None:
    """Bytes of the newest saved state of a member (None when none was kept)."""
    found = sorted(p for p in states.glob("step-*") if p.is_dir())
    if not found:
        return None
    return sum(f.stat().st_size for f in found[-1].rglob("*") if f.is_file())


def pipeline(opts: Options, config: Path) -> dict:
    """make train-members (logged to a file, log.csv rows timed), then ensemble and submission."""
    runs = opts.runs / "pipeline"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    names = [f"scale_s{k}" for k in range(1, opts.members + 1)]
    log = runs / "driver.log"
    tail = Tail([log, *[runs / n / "log.csv" for n in names]])
    tail.start()
    cmd = Command(opts, "train_members", ["-m", "members.launch.experiment", "-c", str(config), "--cpu-procs",
                                          str(opts.cpu_procs), "--keep-states"], log=log)
    try:
        trained = cmd.run()
    finally:
        tail.done.set()
        tail.join()
    trained.update(lines={Path(k).parent.name if k.endswith("log.csv") else "driver": v for k, v in tail.lines.items()},
                   names=names, state_bytes={n: state_folder_bytes(runs / n / "states") for n in names},
                   log_csv_bytes={n: (runs / n / "log.csv").stat().st_size for n in names},
                   train_config=_member_train(runs / names[0]))
    for n in names:  # finished: a rerun must not find (and drop) them
        shutil.rmtree(runs / n / "states", ignore_errors=True)
    result = {"train_members": trained,
              "splits": json.loads((runs / "splits" / "splits.json").read_text(encoding="utf-8"))["counts"]}
    for name, args in (("ensemble", ["-m", "ensemble", "-c", str(config)]),
                       ("submission", ["-m", "submission", "-c", str(config)]),
                       ("submission_valid", ["-m", "submission", "-c", str(config), "--phase", VALID])):
        result[name] = Command(opts, name, args).run()
    return result


def _member_train(member: Path) -> dict:
    """The resolved train section of a trained member (its config.yaml)."""
    return yaml.safe_load((member / "config.yaml").read_text(encoding="utf-8"))["train"]


def compute(opts: Options, config: Path) -> dict:
    from members.launch.experiment import cpu_threads  # the trainer's threads, as the driver sets them

    threads = str(cpu_threads(opts.cpu_procs))
    ran = Command(opts, "compute", ["-m", "bench.scale_children", "compute", str(config), str(opts.compute_steps)],
                  env={"OMP_NUM_THREADS": threads}).run()
    return {**ran, **last_json(ran["output"])}


def clean(opts: Options) -> None:
    """Drop the run's bulk (member folders with their heads, split caches, the start-up's folders); keep
    raw.json (for --render), the driver's log and the zips."""
    shutil.rmtree(opts.runs / "full", ignore_errors=True)
    shutil.rmtree(opts.runs / "stats", ignore_errors=True)
    for entry in (opts.runs / "pipeline").iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/scale"), help="the PIPAL-size tree (kept)")
    parser.add_argument("--runs", type=Path, default=Path("runs/scale"), help="the run folders (replaced)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where scale.md and scale.json go")
    parser.add_argument("--before", type=Path, default=Path("bench/scale_before.json"),
                        help="an earlier scale.json shown as the 'before' column (skipped when missing)")
    parser.add_argument("--distinct", type=int, default=4, help="computed distorted images per reference")
    parser.add_argument("--members", type=int, default=2, help="members trained and predicted (at least 2)")
    parser.add_argument("--cpu-procs", type=int, default=1, help="processes per member (--cpu-procs of the driver)")
    parser.add_argument("--compute-steps", type=int, default=30, help="steps timed on preloaded batches")
    parser.add_argument("--no-step-costs", action="store_true",
                        help="skip timing ViT-B/8 + ResNet-50 (the validation share then uses the tiny member)")
    parser.add_argument("--timeout", type=int, default=7200, help="seconds any one command may take")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: analyse the last run's measurements (<runs>/raw.json) again and rewrite "
                             "scale.md and scale.json (with --before)")
    args = parser.parse_args(argv)
    before = json.loads(args.before.read_text(encoding="utf-8"))["metrics"] if args.before.is_file() else None
    if args.render:
        raw = args.runs / "raw.json"
        if not raw.is_file():
            parser.error(f"--render: {raw} not found; run python -m bench.scale first")
        md, _ = write_report(analyse(json.loads(raw.read_text(encoding="utf-8"))), before, args.out)
        say(f"wrote {md}")
        return 0
    if args.members < 2:
        parser.error("--members: at least 2 (the ensemble needs two)")
    opts = Options(args.data, args.runs, args.out, args.before if before else None, args.distinct,
                   members=args.members, cpu_procs=args.cpu_procs, compute_steps=args.compute_steps,
                   step_costs=not args.no_step_costs, timeout=args.timeout)
    return run(opts)


def run(opts: Options) -> int:
    """Every measurement, then the report; the children run in the repository, so paths are made absolute."""
    opts = dataclasses.replace(opts, data=opts.data.resolve(), runs=opts.runs.resolve(), out=opts.out.resolve())
    started = time.perf_counter()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_start": load(),
                     "machine": {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))},
                     "options": json.loads(json.dumps(asdict(opts), default=str))}
    say(f"tree {opts.data}")
    tree_started = time.perf_counter()
    record = scale_tree.build(opts.data, opts.distinct, opts.sample, shape=opts.shape)
    results["tree"] = {**record, "wall_s": round(time.perf_counter() - tree_started, 2),
                       "disk_bytes": scale_tree.disk_bytes(opts.data)}
    settle(opts.data / scale_tree.MARKER)
    shutil.rmtree(opts.runs / "stats", ignore_errors=True)
    configs = write_configs(opts)
    results["data_check"] = data_checks(opts, configs["full"])
    results["startup_full"] = startup(opts, configs["full"])
    results["costs"] = costs(opts)
    results["pipeline"] = pipeline(opts, configs["pipeline"])
    results["compute"] = compute(opts, configs["pipeline"])
    results["rerun"] = Command(opts, "rerun", ["-m", "members.launch.experiment", "-c", str(configs["pipeline"]),
                                               "--cpu-procs", str(opts.cpu_procs)]).run()
    results["splits_full"] = json.loads((opts.runs / "full" / "splits" / "splits.json").read_text())["counts"]
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_end"] = load()
    atomic_write_text(opts.runs / "raw.json", json.dumps(results) + "\n")  # for --render
    before = json.loads(opts.before.read_text(encoding="utf-8")) if opts.before else None
    md, js = write_report(analyse(results), before and before.get("metrics"), opts.out)
    clean(opts)
    say(f"wrote {md} and {js} in {results['seconds'] / 60:.1f} min (measurements kept in {opts.runs / 'raw.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
