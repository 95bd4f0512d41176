"""The house rules of the layout, read from the code itself.

- The stage contract (`members.contract`), the ensemble and the submission stages load no torch.
- No import circles between the kit's modules, counting imports inside functions too.
- Data flows one way: members -> ensemble -> submission. The one documented exception is the scoring
  API's `Scorer.from_ensemble` (members.engine.scorer, and its checks in members.engine.loading), which
  applies a fitted ensemble through `ensemble.combine`, the one place that defines what an ensemble
  record computes.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("members", "ensemble", "submission")
STAGE = {"members": 0, "ensemble": 1, "submission": 2}
# (importing module, imported module): the documented exceptions to "no earlier stage imports a later one"
LATER_STAGE_ALLOWED = {("members.engine.scorer", "ensemble.combine"), ("members.engine.loading", "ensemble.combine")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (imports for annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                todo.extend(child.orelse)
            else:
                todo.append(child)


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The kit modules that `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # a submodule imported by name counts as that module, any other name as the module it is from
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            # the longest known module that the dotted name starts with (a name imported from a module
            # counts as the module)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target not in PACKAGES:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_the_graph_is_read_from_the_code():
    graph = _graph()
    # a few edges that must exist, so that an empty graph cannot pass the tests below
    assert "members.contract.stagefiles" in graph["ensemble.io"]
    assert "members.model.ahiq" in graph["members.engine.shared"]
    assert "ensemble.combine" in graph["submission.write"]


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_no_stage_imports_a_later_stage():
    bad = [f"{a} imports {b}" for a, targets in _graph().items() for b in sorted(targets)
           if STAGE[b.split(".")[0]] > STAGE[a.split(".")[0]] and (a, b) not in LATER_STAGE_ALLOWED]
    assert bad == []


def test_later_stages_use_only_the_contract_and_the_torch_free_data_lists():
    allowed = ("members.contract.", "members.data.splits", "members.data.index", "members.data.views")
    bad = [f"{a} imports {b}" for a, targets in _graph().items() if not a.startswith("members")
           for b in sorted(targets) if b.startswith("members.") and not b.startswith(allowed)]
    assert bad == []


def test_contract_ensemble_and_submission_load_no_torch():
    mods = [m for m in _modules() if m.startswith(("members.contract", "ensemble", "submission"))]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'accelerate'))\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
    # the issue's own check, as a user types it
    subprocess.run([sys.executable, "-c", "import ensemble, submission, sys; assert 'torch' not in sys.modules"],
                   cwd=ROOT, check=True)


# The rooms inside members/, in the order data flows through them: a room imports only from rooms
# before it (data and model are side by side: neither needs the other).
ROOMS = {"contract": 0, "data": 1, "model": 1, "engine": 2, "train": 3, "launch": 4}


def test_rooms_inside_members_import_only_earlier_rooms():
    graph = _graph()
    rooms = {name: name.split(".")[1] for name in graph if name.startswith("members.") and name.count(".") >= 2}
    assert set(rooms.values()) == set(ROOMS), "a room of members/ is missing from ROOMS (or ROOMS names one gone)"
    bad = [f"{a} imports {b}" for a, targets in graph.items() if a in rooms for b in sorted(targets)
           if b in rooms and (ROOMS[rooms[b]] > ROOMS[rooms[a]] or (rooms[a] != rooms[b] and ROOMS[rooms[b]] == ROOMS[rooms[a]]))]
    assert bad == []
