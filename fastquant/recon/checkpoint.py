"""Resumable reconstruction: the engine's state after every unit, saved atomically.

The state file ``<state_dir>/recon_state.pt`` holds the model's ``state_dict`` (with the
reconstruction wrappers installed, so learned rounding variables and step sizes are in
it), how many units of the flattened schedule are done, the record so far, and a
fingerprint of everything that decides the result: the model, its quantization config,
the reconstruction config, the schedule, the calibration images and the float model's
weights. Resuming checks the fingerprint first and refuses, changing nothing, when it
differs.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..adapters import find_vit
from ..errors import FastquantError
from ..record import record_of

FORMAT = "fastquant-recon-state-v1"
STATE_FILE = "recon_state.pt"


def tensor_digest(tensors) -> str:
    """SHA-256 over the bytes, shapes and dtypes of ``tensors`` (in order)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, fp_model: nn.Module, cfg, schedule: list, images: torch.Tensor) -> dict:
    """What a resumed run must share with the run that saved the state."""
    record = record_of(model)
    spec = getattr(record, "spec", None)
    qcfg = getattr(record, "config", None)
    vit = find_vit(model)
    return {
        "model": spec.to_json() if spec is not None else type(model).__name__,
        "architecture": f"{type(vit).__name__} depth={len(vit.blocks)} dim={vit.embed_dim}",
        "quant_config": qcfg.to_json() if qcfg is not None else None,
        "recon_config": json.dumps(cfg.to_dict(runtime=False), sort_keys=True),
        "schedule": json.dumps([[u.name for u in level] for level in schedule]),
        "calibration": f"{tuple(images.shape)} sha256 {tensor_digest([images])}",
        "float_model": tensor_digest(fp_model.state_dict().values()),
    }


class Checkpoint:
    """The state file of one reconstruction run."""

    def __init__(self, state_dir: str | os.PathLike, fprint: dict):
        self.dir = Path(state_dir)
        self.path = self.dir / STATE_FILE
        self.fingerprint = fprint

    def open(self, resume: bool) -> dict | None:
        """The saved state to resume from (None: start afresh). Checks before anything is
        written: an existing state needs ``resume``, and must come from the same run."""
        if self.dir.exists() and not self.dir.is_dir():
            raise FastquantError(f"state dir {self.dir} is a file")
        if not self.dir.parent.is_dir():
            raise FastquantError(f"the folder holding state dir {self.dir} does not exist")
        if not self.path.exists():
            return None
        if not resume:
            raise FastquantError(f"{self.path} already holds a reconstruction state: resume it (--resume) "
                                 "or choose another state dir")
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
            raise FastquantError(f"cannot read reconstruction state {self.path}: {type(exc).__name__}") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise FastquantError(f"{self.path} is not a fastquant reconstruction state")
        saved = payload.get("fingerprint", {})
        differ = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differ:
            raise FastquantError(f"{self.path} was saved by a different run (different {', '.join(differ)}); "
                                 "nothing was changed: use the same model and settings, or another state dir")
        return payload

    def save(self, state_dict: dict, done: int, record: dict):
        """Write the state after ``done`` units, atomically (write a temporary file, rename)."""
        self.dir.mkdir(exist_ok=True)
        payload = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "done": done,
            "record": record,
            "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        }
        tmp = self.path.with_name(self.path.name + ".partial")
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()
