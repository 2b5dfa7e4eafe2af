"""What fastquant knows about a model it built, quantized, reconstructed or deployed.

One record per model, kept as the attribute ``model.fastquant`` (``record_of(model)``), so
that ``copy.deepcopy``, ``fastquant.save`` and the CLI find everything in one place:

- ``spec``: how to rebuild the architecture (``fastquant.models.ModelSpec``), set by
  ``fastquant.models.load_model``; needed to save;
- ``config``: the ``fastquant.QuantConfig`` it was quantized with;
- ``recon``: the ``fastquant.recon.ReconRecord`` of its reconstruction (per-unit losses);
- ``deploy``: the ``fastquant.deploy.DeployReport`` of its conversion to integer layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

ATTRIBUTE = "fastquant"


@dataclass
class ModelRecord:
    spec: Any = None
    config: Any = None
    recon: Any = None
    deploy: Any = None


def record_of(model: nn.Module, create: bool = False) -> Optional[ModelRecord]:
    """The model's record (None if it has none, unless ``create``)."""
    record = getattr(model, ATTRIBUTE, None)
    if not isinstance(record, ModelRecord):
        if not create:
            return None
        record = ModelRecord()
        object.__setattr__(model, ATTRIBUTE, record)
    return record
