"""`pip install -e .` works (offline) and the package's dependencies are requirements.txt's."""
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


def test_dependencies_are_requirements_txt():
    """requirements.txt (what `make install` and CI install) = the dependencies + the dev extra."""
    required = {line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    project = _project()
    extras = project["optional-dependencies"]
    assert required == set(project["dependencies"]) | set(extras["dev"])
    assert {"cluster", "tensorboard", "dev"} <= set(extras) and extras["cluster"] == ["submitit>=1.5"]
    assert "torch==2.14.1" in project["dependencies"] and "torchvision==0.29.1" in project["dependencies"]


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
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    module, where, extras = out.stdout.splitlines()
    assert Path(module) == REPO / "members" / "__init__.py"  # editable: the working tree itself
    assert Path(where) == site  # the metadata is the fresh venv's, not the interpreter's
    assert extras == "['cluster', 'dev', 'tensorboard']"
