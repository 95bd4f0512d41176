"""`ahiq-kit` (members.launch.kit): each subcommand runs its stage's module as `python -m` would, with
that module's options, output and exit status, and without importing any stage itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from members.launch import kit

REPO = Path(__file__).resolve().parents[1]


def _kit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "members.launch.kit", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_help_lists_every_subcommand_on_one_line():
    out = _kit("--help")
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    for name in ("score", "train", "predict", "ensemble", "evaluate", "submit", "demo-data", "weights", "baselines"):
        (line,) = [ln for ln in lines if ln.split()[:1] == [name]]
        assert len(line.split()) > 2  # the name and a description


def test_a_subcommand_runs_its_module():
    """`ahiq-kit submit --help` is `python -m submission --help`: the module's own argparse help."""
    direct = subprocess.run([sys.executable, "-m", "submission", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    out = _kit("submit", "--help")
    assert out.returncode == 0 == direct.returncode, out.stderr
    # the same options, whatever the usage line calls the program
    assert out.stdout.split("options:")[1] == direct.stdout.split("options:")[1]
    # a module's failure keeps its status and its one error line
    out = _kit("submit", "-c", "no/such/experiment.yaml")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: ") and "no/such/experiment.yaml" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_command_and_missing_module_are_one_line(monkeypatch, capsys):
    assert kit.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown command 'trian'" in err and "train" in err
    # a stage that this installation lacks (evaluate is new): one line, found when it is asked for
    monkeypatch.setitem(kit.COMMANDS, "evaluate", ("ensemble.no_such_stage", "x"))
    assert kit.main(["evaluate", "-c", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "module ensemble.no_such_stage is not part of this installation" in err
    assert kit.main([]) == 2 and "commands:" in capsys.readouterr().err


def test_every_subcommand_names_an_existing_module():
    missing = [f"{name}: {module}" for name, (module, _) in kit.COMMANDS.items() if not kit._available(module)]
    assert missing == []


def test_the_dispatcher_loads_no_stage():
    code = ("import sys, members.launch.kit as k; k.main(['--help']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ensemble', 'submission') "
            "or m.startswith(('members.engine', 'members.train', 'members.model'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("code,status", [(None, 0), (0, 0), (3, 3), ("error: boom", 1)])
def test_exit_status_is_the_modules(tmp_path, monkeypatch, code, status):
    probe, seen = tmp_path / "kit_probe_mod.py", tmp_path / "seen.json"
    record = "[sys.argv, sys.modules['__main__'].__name__, __name__]"
    probe.write_text(f"import json, sys\nopen({str(seen)!r}, 'w').write(json.dumps({record}))\nsys.exit({code!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(kit.COMMANDS, "probe", ("kit_probe_mod", "x"))
    monkeypatch.setattr(sys, "argv", ["ahiq-kit"])
    assert kit.main(["probe", "--flag", "v"]) == status
    # as `python -m kit_probe_mod --flag v` sees it: its file in argv[0], itself as __main__
    seen = json.loads(seen.read_text())
    assert seen == [[str(probe), "--flag", "v"], "__main__", "__main__"]
