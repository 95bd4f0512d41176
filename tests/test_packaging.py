"""`pip install -e .` works (offline), with its `ahiq-kit` script; the package's dependencies are
requirements.txt's, except torch and torchvision, which requirements.txt pins inside the package's ranges."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _requirements() -> list[str]:
    return [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_dependencies_are_requirements_txt():
    """requirements.txt (what `make install` and CI install) = the dependencies + the dev extra, except
    that it pins torch and torchvision where the package gives a range (test below)."""
    requirement = pytest.importorskip("packaging.requirements").Requirement
    pinned = {"torch", "torchvision"}
    required = {r for r in _requirements() if requirement(r).name not in pinned}
    project = _project()
    extras = project["optional-dependencies"]
    deps = {d for d in project["dependencies"] if requirement(d).name not in pinned}
    assert required == deps | set(extras["dev"])
    assert {"cluster", "tensorboard", "dev"} <= set(extras) and extras["cluster"] == ["submitit>=1.5"]
    assert {requirement(d).name for d in project["dependencies"]} >= pinned


def test_the_pins_lie_in_the_package_ranges():
    """Before: pyproject.toml pinned torch==2.14.1 too, so `pip install -e .` replaced any other torch
    (GBs). Now the package gives a range, and requirements.txt's exact pins must satisfy it."""
    requirement = pytest.importorskip("packaging.requirements").Requirement
    ranges = {requirement(d).name: requirement(d).specifier for d in _project()["dependencies"]}
    pins = {r.name: r.specifier for r in map(requirement, _requirements()) if r.name in ("torch", "torchvision")}
    assert set(pins) == {"torch", "torchvision"}
    for name, pin in pins.items():
        (exact,) = list(pin)
        assert exact.operator == "==", f"requirements.txt pins {name} exactly"
        assert ranges[name].contains(exact.version), f"{name}=={exact.version} is outside pyproject's {ranges[name]}"
        assert not any(s.operator == "==" for s in ranges[name]), f"pyproject.toml gives {name} a range, not a pin"
        assert ranges[name].contains("2.5.0" if name == "torch" else "0.20.0")  # the oldest the kit supports


def test_console_script_is_the_kit_dispatcher():
    assert _project()["scripts"] == {"ahiq-kit": "members.launch.kit:main"}


@pytest.mark.slow
def test_editable_install_into_a_fresh_venv(tmp_path):
    """A fresh venv gets the kit with `pip install -e .`, without a download: the build uses this
    environment's setuptools (--no-build-isolation) and the dependencies come from it (a .pth file)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
           "--no-index", "--quiet", "-e", str(REPO)]
    proc = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    probe = ("import importlib.metadata as m, members, ensemble, submission; from members import Scorer; "
             "from members.launch.jobs import ClusterConfig; d = m.distribution('ahiq-ntire-kit'); "
             "print(members.__file__); print(d.locate_file('')); print(sorted(d.metadata.get_all('Provides-Extra')))")
    # the console script pip wrote into the venv runs the dispatcher
    kit = subprocess.run([str(venv / "bin" / "ahiq-kit"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert kit.returncode == 0 and "score" in kit.stdout and "submit" in kit.stdout, kit.stdout + kit.stderr
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    module, where, extras = out.stdout.splitlines()
    assert Path(module) == REPO / "members" / "__init__.py"  # editable: the working tree itself
    assert Path(where) == site  # the metadata is the fresh venv's, not the interpreter's
    assert extras == "['cluster', 'dev', 'tensorboard']"


def _copy_of_the_sources(dest: Path) -> Path:
    """The repository's sources without what a checkout accumulates (venv, runs, data, build litter), so
    that the wheel is built from what a clone has and the working tree gets no build/ folder."""
    import shutil

    litter = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = {".venv", ".git", "data", "runs", "build"} if Path(folder) == REPO else set()  # members/data stays
        return (top & set(names)) | litter(folder, names)

    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_a_built_wheel_installs_every_subpackage(tmp_path):
    """Before: `packages = [members, ensemble, submission]` put members/__init__.py in the wheel and none of
    members/contract, data, model, engine, train or launch, so `ahiq-kit` and `from members import Scorer`
    failed wherever the kit was installed from a wheel (a cluster). Build one, install it in a fresh venv
    (dependencies from this environment, no download) and use it from outside the repository."""
    src = _copy_of_the_sources(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL")}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("ahiq_ntire_kit-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("members/contract/stagefiles.py", "members/data/splits.py", "members/model/ahiq.py",
                   "members/engine/scorer.py", "members/train/loop.py", "members/launch/kit.py",
                   "ensemble/combine.py", "submission/check.py"):
        assert module in names, f"{module} is not in the wheel"
    assert not any(n.startswith(("tests/", "bench/", "configs/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "deps.pth").write_text("\n".join(deps) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet",
           str(wheel)]
    proc = subprocess.run(pip, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    kit = subprocess.run([str(venv / "bin" / "ahiq-kit"), "--help"], cwd=outside, env=env, capture_output=True,
                         text=True, timeout=300)
    assert kit.returncode == 0 and "score" in kit.stdout and "submit" in kit.stdout, kit.stdout + kit.stderr
    probe = "import members; from members import Scorer; import ensemble.combine, submission.check; print(members.__file__)"
    out = subprocess.run([str(python), "-c", probe], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "members" / "__init__.py"  # the installed copy, not the repository
