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
from ..files import atomic_write
from ..record import record_of

FORMAT = "fastquant-recon-state-v1"
# The fields of a unit's record (fastquant.recon.engine.UnitRecord), as saved.
UNIT_FIELDS = {"level", "index", "name", "iters", "loss_first", "loss_last", "round_reg_last", "mse_before",
               "mse_after", "seconds", "history"}
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

    def open(self, resume: bool, units: int) -> dict | None:
        """The saved state to resume from (None: start afresh). Checks before anything is
        written: an existing state needs ``resume``, must come from the same run (the
        fingerprint), must be intact (its checksum) and well formed (``units``: the length of
        the flattened schedule)."""
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
        if not isinstance(saved, dict):
            raise FastquantError(f"{self.path} is corrupted: its fingerprint is not a mapping")
        differ = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
        if differ:
            raise FastquantError(f"{self.path} was saved by a different run (different {', '.join(differ)}); "
                                 "nothing was changed: use the same model and settings, or another state dir")
        self._check_payload(payload, units)
        return payload

    def _check_payload(self, payload: dict, units: int):
        """The fields a resume reads: intact (checksum), of the right types and in range."""
        state, done, record = payload.get("state_dict"), payload.get("done"), payload.get("record")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FastquantError(f"{self.path} is corrupted: no model state in it")
        if payload.get("checksum") != state_checksum(state, done, record):
            raise FastquantError(f"{self.path} is corrupted: its content does not match its checksum")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= units:
            raise FastquantError(f"{self.path} is corrupted: {done!r} units done, of {units}")
        saved_units = record.get("units") if isinstance(record, dict) else None
        if not isinstance(saved_units, list) or len(saved_units) != done:
            raise FastquantError(f"{self.path} is corrupted: its record does not list the {done} units done")
        for unit in saved_units:
            if not isinstance(unit, dict) or set(unit) != UNIT_FIELDS:
                raise FastquantError(f"{self.path} is corrupted: a unit's record is malformed")
        for name, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FastquantError(f"{self.path} is corrupted: tensor {name} holds NaN or Inf")

    def save(self, state_dict: dict, done: int, record: dict):
        """Write the state after ``done`` units, atomically (``fastquant.files.atomic_write``)."""
        self.dir.mkdir(exist_ok=True)
        state = {k: v.detach().cpu() for k, v in state_dict.items()}
        payload = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "done": done,
            "record": record,
            "state_dict": state,
            "checksum": state_checksum(state, done, record),
        }
        atomic_write(self.path, lambda tmp: torch.save(payload, tmp))


def state_checksum(state: dict, done, record) -> str:
    """SHA-256 over the model state (names, shapes, dtypes, bytes), the units done and the record."""
    h = hashlib.sha256(json.dumps([done, record], sort_keys=True, default=str).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_digest([state[name]]).encode())
    return h.hexdigest()
