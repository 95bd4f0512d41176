"""AHIQ members: model, data, training, prediction; `from members import Scorer` scores your own pairs
(a torch.nn.Module: `Scorer.from_ensemble(dir)(dis, ref)`, see members.engine.scorer)."""
from __future__ import annotations

__all__ = ["Scorer"]


def __getattr__(name: str):
    # Lazy: `import members.contract.config` (the submission checker, the ensemble) must not pull in torch.
    if name == "Scorer":
        from members.engine.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'members' has no attribute {name!r}")
