"""`ahiq-kit`: one command for every stage of the kit (the console script of `pip install -e .`).

    ahiq-kit score --ensemble runs/demo DIS.png REF.png
    ahiq-kit train -c configs/demo.yaml          # = python -m members.launch.experiment -c configs/demo.yaml
    ahiq-kit submit --help

Each subcommand runs its stage's module as `python -m MODULE ARGS...` would (`runpy`, with `sys.argv`
rewritten), so its options, messages and exit status are the module's own. The modules are named by
string and found only when their subcommand runs: this file imports no stage (members ->
ensemble -> submission stays one-way, tests/test_layout.py), `ahiq-kit --help` starts without torch,
and a module missing from this installation is one error line, not an import failure at start-up.
"""
from __future__ import annotations

import importlib.util
import runpy
import sys

# subcommand -> (module run as __main__, one line for --help); the order is the pipeline's
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("members.data.demo_data", "generate the small synthetic-label demo dataset (make demo-data)"),
    "weights": ("members.model.weights", "download the configured backbone weights into weights/ (make weights)"),
    "preflight": ("members.launch.preflight", "before a long run: data, disk, real steps per member, estimates"),
    "train": ("members.launch.experiment", "train every member of an experiment, then predict (make train-members)"),
    "predict": ("members.engine.predict_all", "re-predict an experiment's trained members (make predict-all)"),
    "baselines": ("members.train.baselines", "PSNR, SSIM and untrained-feature baselines on a member's splits"),
    "ensemble": ("ensemble", "fit the ensemble of an experiment's members and write its report (make ensemble)"),
    "evaluate": ("ensemble.evaluate", "SRCC/PLCC/KRCC of the members and the ensemble on a labelled split"),
    "submit": ("submission", "write and check the challenge zip (make submit)"),
    "check": ("submission.check", "validate a submission zip before uploading it"),
    "score": ("members.engine.score", "score your own image pairs with a member or an ensemble (make score)"),
}
PROG = "ahiq-kit"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {PROG} COMMAND [ARGS...]   ({PROG} COMMAND --help: that command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def _available(module: str) -> bool:
    """Whether `module` can be found here, without running it (its parent packages are imported:
    they are light, and the kit's packages load no torch at import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        sys.stderr.write(usage())
        return 2
    if args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: {PROG}: unknown command {name!r}; one of: {', '.join(COMMANDS)} ({PROG} --help)",
              file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if not _available(module):
        print(f"error: {PROG} {name}: module {module} is not part of this installation of the kit; update the "
              f"kit (git pull, then pip install -e .)", file=sys.stderr)
        return 2
    # As `python -m module rest...`: alter_sys puts the module in sys.modules["__main__"] (what pickling
    # by reference needs) and its file in argv[0] while it runs, as -m does.
    sys.argv = [f"{PROG} {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:  # the stages end through run_main's sys.exit: their status is ours
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
