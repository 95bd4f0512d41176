"""YAML -> dataclass configs: unknown keys and types with file and line, `base:` chains, overrides."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from members.contract.atomic import atomic_write_text
from members.contract.config import ConfigError, apply_overrides, from_dict, load_yaml, read_yaml_with_base


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 3


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    path: str | None = None


def test_unknown_and_mistyped_keys_name_file_and_line(tmp_path):
    (tmp_path / "c.yaml").write_text("name: a\ninner:\n  lr: 0.5\n  stpes: 4\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 4: 'inner\.stpes' unknown key; valid keys of 'inner': lr, steps"):
        from_dict(Outer, load_yaml(tmp_path / "c.yaml"))
    (tmp_path / "d.yaml").write_text("name: a\ninner:\n  steps: many\n")
    with pytest.raises(ConfigError, match=r"d\.yaml, line 3: 'inner\.steps': expected int, got 'many'"):
        from_dict(Outer, load_yaml(tmp_path / "d.yaml"))


def test_values_are_coerced_only_where_safe(tmp_path):
    cfg = from_dict(Outer, {"inner": {"lr": "1e-3", "steps": 2}, "tags": ["a"], "path": None})
    assert cfg.inner.lr == 1e-3 and cfg.inner.steps == 2 and cfg.tags == ["a"]
    with pytest.raises(ConfigError, match="expected int"):
        from_dict(Outer, {"inner": {"steps": True}})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(Outer, {"inner": {"lr": "fast"}})


@dataclass
class Checked:
    rate: float = 0.1

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"inner.rate must be > 0; got {self.rate}")


@dataclass
class Holder:
    inner: Checked = field(default_factory=Checked)


def test_non_finite_numbers_and_post_init_checks_name_file_and_line(tmp_path):
    """Before: `.nan` passed as a float (and every `< 0` check after it), and a `__post_init__` check
    named the section only."""
    (tmp_path / "n.yaml").write_text("name: a\ninner:\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=r"n\.yaml, line 3: 'inner\.lr': expected a finite number, got nan$"):
        from_dict(Outer, load_yaml(tmp_path / "n.yaml"))
    with pytest.raises(ConfigError, match=r"'inner\.lr': expected a finite number, got '-inf'$"):
        from_dict(Outer, {"inner": {"lr": "-inf"}})
    (tmp_path / "c.yaml").write_text("inner:\n  rate: -1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 2: 'inner\.rate': must be > 0; got -1\.0$"):
        from_dict(Holder, load_yaml(tmp_path / "c.yaml"))


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\ninner:\n  lr: 0.5\n  steps: 9\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nname: child\ninner:\n  steps: 1\n")
    data = apply_overrides(read_yaml_with_base(tmp_path / "child.yaml"), ["inner.lr=0.25", "tags=[a, b]"])
    cfg = from_dict(Outer, data)
    assert (cfg.name, cfg.inner.lr, cfg.inner.steps, cfg.tags) == ("child", 0.25, 1, ["a", "b"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["inner.lr"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out" / "f.txt"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_a_repeated_key_is_an_error_not_a_silent_override(tmp_path):
    from members.contract.config import load_yaml

    path = tmp_path / "exp.yaml"
    path.write_text("name: a\nensemble:\n  folds: 3\nruns_dir: r\nensemble:\n  folds: 5\n")
    with pytest.raises(ConfigError, match=r"exp.yaml, line 5: key 'ensemble' repeats line 2"):
        load_yaml(path)
    path.write_text("model:\n  crop: 64\n  crop: 32\n")
    with pytest.raises(ConfigError, match="line 3: key 'crop' repeats line 2"):
        load_yaml(path)
