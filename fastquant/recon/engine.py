"""The reconstruction engine: learn each unit's quantization state, unit by unit.

    qmodel = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=4))
    record = fastquant.recon.run_method(model, qmodel, calib, "pfcr", ReconConfig(iters=500))

A method is a registered record (``fastquant.recon.registry``); the engine runs any of them
the same way. For every unit of every level of the method's schedule, in order,
:func:`reconstruct`

1. captures the unit's input from the quantized prefix (the quantized model up to the
   unit, earlier units already reconstructed, in hard rounding) and from the float
   prefix, and the float model's output of the unit (the target);
2. lets the method prepare the unit (``before_unit``: PFCR relaxes the rounding that
   earlier levels decided), then trains the unit's learnable state (AdaRound rounding of
   every QuantLinear weight, LSQ steps of its activation quantizers; see
   ``fastquant.quant.learnable``) with Adam on random batches, stage by stage (the method's
   ``stages``: which operands pass in float during each): the unit's input is the
   quantized input with each element replaced by the float one with probability
   ``qdrop_p`` (and QDrop inside the unit likewise); the loss is the sum of the loss terms
   with a nonzero weight (``fastquant.recon.losses``), each divided by its value at the
   first step of the stage, plus the AdaRound regulariser;
3. moves on with the unit in hard rounding. A later level starts from the rounding and
   step sizes the earlier levels learned.

At the end (or when interrupted) the hard rounding is written into the weights and the
learned steps into the quantizers, so the model is again a plain fake-quant model whose
outputs equal the hard-rounded reconstruction's. The float reference is ``fp_model`` or,
if none is given, a copy of the model with its quantizers off.

Randomness (batches, QDrop masks) comes from generators seeded per unit from
``(seed, level, unit index)``, so a run resumed from its state file (``state_dir``)
ends exactly where an uninterrupted run does.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import Unit, depth_of, embed, find_vit, run_span, unit_modules
from ..errors import FastquantError
from ..nn import QuantLinear
from ..nn.observe import linear_input_stats
from ..quant import AdaRoundWeight, beta_at, gptq_round, quantizers_in, quantizers_off, set_mode
from ..record import record_of
from ..validate import check_images
from .checkpoint import Checkpoint, fingerprint
from .config import GRID_MAX_BITS, ReconConfig, grid_dtype
from .head import quantized_head, train_head_step
from .learnable import LearnableState
from .losses import TERMS, StepBatch
from .registry import get_method
from .schedules import normalize_schedule


@dataclass
class UnitRecord:
    """What happened to one unit. ``history``: the training loss per step (the weighted
    loss terms, each divided by its first value; without the rounding regulariser,
    whose last value is ``round_reg_last``); ``loss_first``, ``loss_last``: its ends.
    ``mse_before`` / ``mse_after``: mean squared error of the unit's hard-rounded
    output against its float target, over all calibration images, before and after
    its training."""

    level: int
    index: int
    name: str
    iters: int
    loss_first: float
    loss_last: float
    round_reg_last: float
    mse_before: float
    mse_after: float
    seconds: float
    history: list = field(default_factory=list)


@dataclass
class ReconRecord:
    method: str
    config: dict
    schedule: list
    units: list = field(default_factory=list)
    complete: bool = False
    resumed_from: int = 0  # units already done in the state file this run resumed
    seconds: float = 0.0  # this call's wall time

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def losses(self) -> dict:
        """{(level, unit name): loss history}, e.g. for a plot."""
        return {(u.level, u.name): u.history for u in self.units}


def _unit_seed(seed: int, level: int, index: int) -> int:
    digest = hashlib.sha256(f"fastquant-recon/{seed}/{level}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _bias_corrected(model: nn.Module) -> bool:
    record = record_of(model)
    resolve = getattr(getattr(record, "config", None), "resolved", None)
    return bool(resolve("bias_correct")) if callable(resolve) else False


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of a fake-quant model with every quantizer off: its float reference."""
    fp = copy.deepcopy(model)
    set_mode(quantizers_in(fp), "off")
    return fp.eval()


def schedule_for(model: nn.Module, cfg: ReconConfig) -> list[list[Unit]]:
    """The levels of units that ``cfg``'s method reconstructs."""
    return get_method(cfg.method).schedule(model, cfg)


def _grid_bits_ok(layer: QuantLinear) -> bool:
    """Whether a layer's operands are narrow enough for the bf16 grid product: at most
    ``GRID_MAX_BITS`` bits each, so soft-rounded weight codes keep their rounding variable
    to 2^-5 and QDrop's float elements ``x / s`` (below 2^bits in magnitude) to 2^-4."""
    bits = [getattr(getattr(q, "quantizer", None), "bits", None) for q in (layer.weight_quant, layer.input_quant)]
    return all(b is not None and b <= GRID_MAX_BITS for b in bits)


def qdrop_at(cfg: ReconConfig, p: float, it: int) -> float:
    """QDrop's probability at step ``it`` of a unit (``qdrop_schedule``)."""
    if cfg.resolved("qdrop_schedule") == "linear":
        return p * (1 - it / cfg.iters)
    return p


def _float_params(modules: list[nn.Module], cfg: ReconConfig) -> list[tuple[list, float]]:
    """The unit's float parameters reconstruction may train, with their learning rates: the
    biases of its quantized Linear layers (``lr_bias``) and its LayerNorms' affine parameters
    (``lr_norm``)."""
    biases, norms, seen = [], [], set()
    for root in modules:
        for m in root.modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, QuantLinear) and m.bias is not None:
                biases.append(m.bias)
            elif isinstance(m, nn.LayerNorm):
                norms += [p for p in (m.weight, m.bias) if p is not None]
    return [(biases, cfg.lr_bias), (norms, cfg.lr_norm)]


class _Stream:
    """Tokens at one position of the residual stream for all calibration images, from the
    quantized model (``q``) and the float model (``fp``), on the storage device; ``at``:
    the half they are at."""

    def __init__(self, level: int, q: torch.Tensor, fp: torch.Tensor):
        self.level, self.at, self.q, self.fp = level, 0, q, fp


@dataclass
class UnitContext:
    """What a method's ``before_unit`` and the loss terms see of the unit being trained."""

    engine: "_Engine"
    unit: Unit
    level: int
    index: int
    cfg: ReconConfig
    layers: list  # the unit's QuantLinear layers with learnable rounding
    trained_halves: set  # halves of this unit an earlier unit already reconstructed
    target: Optional[torch.Tensor] = None  # the float model's output of the unit, all images

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def fp(self) -> nn.Module:
        return self.engine.fp

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def names(self) -> dict:
        return self.engine.names

    @property
    def fp_modules(self) -> dict:
        return self.engine.fp_modules

    @property
    def state(self) -> LearnableState:
        return self.engine.state

    def float_logits(self) -> torch.Tensor:
        return self.engine.float_logits()


class _Engine:
    """One reconstruction run's working state: the models, the calibration images, the
    learnable wrappers installed in every unit of the schedule, captured tensors."""

    def __init__(self, model, fp, levels, images, cfg, progress):
        self.model, self.fp, self.images, self.cfg = model, fp, images, cfg
        self.method = get_method(cfg.method)
        self.progress = progress
        self.device = next(model.parameters()).device
        self.storage = None  # decided on the first capture
        self.names = {m: n for n, m in model.named_modules()}
        self.fp_modules = dict(fp.named_modules())
        self.fp_logits = None
        all_mods = []
        for level in levels:
            for u in level:
                all_mods += [m for m in unit_modules(model, u) if all(m is not s for s in all_mods)]
        self.state = LearnableState(all_mods)
        self.n_levels = len(levels)
        self.grid_dtype = grid_dtype(cfg.matmul_dtype, self.device)
        self.grid_linears = [m for m in find_vit(model).blocks.modules()
                             if isinstance(m, QuantLinear) and _grid_bits_ok(m)]

    def set_grid(self, on: bool):
        """Training steps compute the blocks' linear layers on integer grids (see
        ``ReconConfig.matmul_dtype``); everything else in fp32."""
        for m in self.grid_linears:
            m.set_grid_dtype(self.grid_dtype if on else None)

    @torch.no_grad()
    def check_float_weights(self):
        """Refuse weights that are already rounded to their grid (by GPTQ, or by an earlier
        reconstruction): AdaRound chooses between the two grid points around a float
        weight, and a weight on a grid point leaves it only the one above."""
        for layer, w in self.state.weights.items():
            x = layer.weight / w.quantizer.scale
            on_grid = ((x - torch.round(x)).abs() < 1e-3).float().mean().item()
            if on_grid > 0.5:
                raise FastquantError(f"the weights of {self.names[layer]} are already rounded to their quantization grid "
                                     f"({on_grid:.0%} on it): reconstruction learns the rounding and needs the float "
                                     "weights (quantize with round-to-nearest weights, not GPTQ)")

    @torch.no_grad()
    def start_rounding_from_gptq(self, restart: bool = True):
        """``round_start="gptq"``: every learned rounding restarts around GPTQ's compensated
        weight of its layer (:meth:`AdaRoundWeight.start_from`), GPTQ taking the second
        moment of the layer's input in one float pass of the model over the calibration
        images (quantizers off, as calibration's GPTQ does). ``restart=False`` (a resumed
        run: its rounding comes from the saved state) only records the start weights."""
        layers = list(self.state.weights)
        bs = self.cfg.capture_batch_size
        batches = [self.images[i:i + bs].to(self.device) for i in range(0, len(self.images), bs)]
        # the engine's input quantizers are learnable wrappers: observed in float, left as they are
        with quantizers_off(quantizers_in(self.model)):
            stats = linear_input_stats(self.model, batches, covariance=True, progress=self.progress, layers=layers,
                                       quantized=False)
        for m in tqdm(layers, desc="GPTQ rounding start", leave=False, disable=not self.progress):
            w = self.state.weights[m]
            _, before = gptq_round(m.weight, w.quantizer, stats[m].second_moment().to(m.weight.device),
                                   compensated=True)
            w.start_from(before, restart)

    # -- batched no-grad maps over the calibration set -------------------------------
    def _map(self, fn: Callable, x: torch.Tensor) -> torch.Tensor:
        bs = self.cfg.capture_batch_size
        outs = [fn(x[i:i + bs].to(self.device)).to(self.storage) for i in range(0, len(x), bs)]
        return torch.cat(outs)

    def _decide_storage(self, tokens: torch.Tensor):
        need = 3 * len(self.images) * tokens[0].numel() * tokens.element_size()
        if self.device.type == "cpu":
            self.storage = self.device
            return
        limit = self.cfg.max_device_bytes
        if limit is None:
            limit = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 0
        self.storage = self.device if need <= limit else torch.device("cpu")

    @torch.no_grad()
    def start_stream(self, level: int) -> _Stream:
        """The embedding's output: position 0 of ``level``."""
        if self.storage is None:
            self._decide_storage(embed(self.model, self.images[:1].to(self.device)))
        q = self._map(lambda x: embed(self.model, x), self.images)
        fp = self._map(lambda x: embed(self.fp, x), self.images)
        return _Stream(level, q, fp)

    @torch.no_grad()
    def advance(self, s: _Stream, at: int):
        if s.at < at:
            s.q = self._map(lambda x: run_span(self.model, x, s.at, at), s.q)
            s.fp = self._map(lambda x: run_span(self.fp, x, s.at, at), s.fp)
            s.at = at

    @torch.no_grad()
    def _hard_pass(self, unit: Unit, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The unit's hard-rounded output for all images, and its MSE against ``target``."""
        out = self._map(lambda b: run_span(self.model, b, unit.start, unit.end), x)
        sq = sum(float((out[i:i + 1024] - target[i:i + 1024]).double().pow(2).sum()) for i in range(0, len(out), 1024))
        return out, sq / out.numel()

    def float_logits(self) -> torch.Tensor:
        if self.fp_logits is None:
            with torch.no_grad():
                self.fp_logits = self._map(self.fp, self.images)
        return self.fp_logits

    # -- one unit ----------------------------------------------------------------------
    def train_unit(self, li: int, ui: int, unit: Unit, s: _Stream, trained: set, label: str) -> UnitRecord:
        """Reconstruct ``unit`` (unit ``ui`` of level ``li``) from the stream at its start,
        then advance the stream past it. ``trained``: halves an earlier unit reconstructed."""
        cfg, model, method = self.cfg, self.model, self.method
        iters = method.level_iters(cfg, li) if method.level_iters else cfg.iters
        if iters != cfg.iters:  # this level's own step count, at the run's learning rates
            cfg = cfg.with_iters(iters)
        t0 = time.time()
        weights, acts = self.state.of(unit_modules(model, unit))
        with torch.no_grad():
            target = self._map(lambda x: run_span(self.fp, x, unit.start, unit.end), s.fp)
        _, mse_before = self._hard_pass(unit, s.q, target)
        ctx = UnitContext(self, unit, li, ui, cfg, [layer for layer, _ in weights],
                          trained & set(range(unit.start, unit.end)), target)
        if method.before_unit is not None:
            method.before_unit(ctx)

        seed = _unit_seed(cfg.seed, li, ui)
        gen_batch = torch.Generator().manual_seed(seed)
        gen_drop = torch.Generator(device=self.device).manual_seed(seed)
        qdrop_p = cfg.resolved("qdrop_p")
        alphas = [w.alpha for _, w in weights]
        scales = [a.scale for a in acts if a.scale is not None]
        if not alphas and not scales:
            raise FastquantError(f"unit {unit.name} has nothing to learn (no quantized layers)")
        floats = _float_params(unit_modules(model, unit), cfg)
        lrs = ((alphas, cfg.resolved("lr_round")), (scales, cfg.resolved("lr_act")), *floats)
        groups = [{"params": ps, "lr": lr, "initial_lr": lr, "decays": ps is not alphas}
                  for ps, lr in lrs if ps and lr > 0]
        opt = torch.optim.Adam(groups)
        learned = alphas + scales + [p for ps, lr in floats if lr > 0 for p in ps]
        for p in learned:
            p.requires_grad_(True)
        self.state.mark_trained(unit_modules(model, unit))
        self.state.start_training(weights, acts, gen_drop)
        stages, round_from = method.stages(cfg)
        # The regulariser's schedule: this unit's rounding steps are steps window[0] onwards
        # of a schedule of window[1] steps (by default the unit's own).
        rounding_steps = cfg.iters - round_from
        window = method.round_window(ctx, rounding_steps) if method.round_window else (0, rounding_steps)
        stage_at = {st.start: st for st in stages}  # a later stage at the same step replaces an earlier one
        terms = [(spec.name, w, spec.make(ctx)) for spec in TERMS for w in [cfg.resolved(spec.weight)]
                 if w > 0 and (spec.applies is None or spec.applies(ctx))]
        n, bs = len(s.q), min(cfg.batch_size, len(s.q))
        history, norms, reg_last = [], {}, 0.0
        bar = tqdm(range(cfg.iters), desc=label, unit="it", disable=not self.progress, leave=False)
        self.set_grid(True)
        st = None
        try:
            for it in bar:
                p_it = qdrop_at(cfg, qdrop_p, it)
                if it in stage_at:  # each stage normalises its losses afresh
                    norms = {}
                    st = stage_at[it]
                    self.state.enter_stage(weights, acts, st.float_weights, st.float_acts, p_it)
                elif st is not None and not st.float_acts and p_it != qdrop_at(cfg, qdrop_p, it - 1):
                    for a in acts:
                        a.configure(drop_p=p_it)
                if cfg.lr_schedule == "cosine":
                    for group in opt.param_groups:
                        if group["decays"]:
                            group["lr"] = group["initial_lr"] * 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
                idx = torch.randperm(n, generator=gen_batch)[:bs]
                x_q = s.q[idx.to(s.q.device)].to(self.device)
                x_fp = s.fp[idx.to(s.fp.device)].to(self.device)
                x_in = x_q
                if p_it > 0:
                    keep_float = torch.rand(x_q.shape, generator=gen_drop, device=self.device) < p_it
                    x_in = torch.where(keep_float, x_fp, x_q)
                for _, _, term in terms:
                    term.before_forward()
                out = run_span(model, x_in, unit.start, unit.end)
                batch = StepBatch(idx, x_fp, target[idx.to(target.device)].to(self.device))
                values = {name: (w, term.value(out, batch)) for name, w, term in terms}
                fit = sum(wt * t / norms.setdefault(k, t.detach().clamp_min(1e-12)) for k, (wt, t) in values.items())
                loss = fit
                beta = None
                if it >= round_from:
                    beta = beta_at(window[0] + it - round_from, window[1], cfg.warmup, cfg.beta)
                if beta is not None and cfg.round_weight > 0 and weights:
                    reg = cfg.round_weight * sum(w.regularizer(beta) for _, w in weights)
                    loss = loss + reg
                    reg_last = reg.item()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history.append(fit.item())
                if it % 10 == 0 or it == cfg.iters - 1:
                    bar.set_postfix_str(f"loss {history[-1]:.4g}", refresh=False)
        finally:
            bar.close()
            self.set_grid(False)
            for _, _, term in terms:
                term.close()
            for p in learned:
                p.requires_grad_(False)
                p.grad = None
            self.state.stop_training(weights, acts)

        s.q, mse_after = self._hard_pass(unit, s.q, target)
        s.fp, s.at = target, unit.end
        return UnitRecord(li, ui, unit.name, cfg.iters, history[0], history[-1], reg_last, mse_before, mse_after,
                          round(time.time() - t0, 3), history)

    # -- the classifier head's input step (head_iters) -------------------------------
    def train_head(self, s: Optional[_Stream], label: str) -> UnitRecord:
        """``head_iters``: :func:`train_head_step` on the quantized model's final tokens of
        the calibration images (from the stream when it is there, else one pass of the
        model in its hard-rounded state) against the float model's logits."""
        t0, model, end = time.time(), self.model, 2 * depth_of(self.model)
        with torch.no_grad():
            tokens = s.q if s is not None and s.at == end else \
                self._map(lambda x: run_span(model, embed(model, x), 0, end), self.images)
        history, before, after = train_head_step(model, tokens, self.float_logits(), self.cfg,
                                                 _unit_seed(self.cfg.seed, self.n_levels, 0), self.progress, label)
        return UnitRecord(self.n_levels, 0, "head", self.cfg.head_iters, history[0], history[-1], 0.0, before, after,
                          round(time.time() - t0, 3), history)


def reconstruct(model: nn.Module, levels, calib_images: torch.Tensor, cfg: ReconConfig | None = None, *,
                fp_model: nn.Module | None = None, state_dir=None, resume: bool = False, progress: bool = True,
                max_units: int | None = None, on_unit: Callable[[UnitRecord], None] | None = None) -> ReconRecord:
    """Reconstruct ``model`` (a calibrated fake-quant model from ``fastquant.quantize``), in
    place, unit by unit over ``levels`` (a list of levels, each a list of units or unit
    names; a plain list of units is one level), on ``calib_images`` [N, C, H, W].

    ``fp_model``: the float model giving targets (default: ``model`` with quantizers off,
    refused for a bias-corrected model, which is not the float model then).
    ``state_dir``: save the state after every unit there; ``resume``: continue from it
    (an existing state without ``resume``, or one from a different run, is an error and
    nothing is overwritten). ``max_units``: stop after this many units (the state stays
    resumable). ``on_unit``: called with each finished unit's record. With
    ``cfg.head_iters`` the classifier head's input step is trained after the last unit
    (``fastquant.recon.head``), one more unit of the run, recorded as ``head``.
    Returns the record of per-unit losses; the model ends with hard rounding written back.
    """
    cfg = ReconConfig() if cfg is None else cfg
    if resume and state_dir is None:
        raise FastquantError("resuming needs the state dir of the run to resume (--state-dir)")
    if not isinstance(cfg, ReconConfig):
        raise FastquantError(f"cfg must be a fastquant.recon.ReconConfig, got {type(cfg).__name__}")
    if max_units is not None and (isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 0):
        raise FastquantError(f"max_units must be a non-negative integer or None, got {max_units!r}")
    cfg.check_options_apply()
    levels = normalize_schedule(model, levels)
    images = check_images(calib_images)
    if fp_model is None or fp_model is model:
        if _bias_corrected(model):
            raise FastquantError("the model's biases were corrected for quantization (QuantConfig.bias_correct), so "
                                 "with its quantizers off it is not the float model: pass fp_model")
        fp = float_copy(model)
    else:
        fp = fp_model
        if len(find_vit(fp).blocks) != len(find_vit(model).blocks):
            raise FastquantError("fp_model and model have different numbers of blocks")
        devices = {next(m.parameters()).device for m in (model, fp)}
        if len(devices) > 1:
            raise FastquantError(f"fp_model and model are on different devices ({', '.join(map(str, devices))})")
        shared = {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in fp.parameters()}
        if shared:
            raise FastquantError("fp_model shares parameters with model: pass a separate float model "
                                 "(fastquant.quantize returns a copy unless inplace=True)")
    checkpoint = None
    resumed = None
    if state_dir is not None:
        checkpoint = Checkpoint(state_dir, fingerprint(model, fp, cfg, levels, images))
        resumed = checkpoint.open(resume, sum(len(level) for level in levels) + (1 if cfg.head_iters else 0))

    was_training = [(m, m.training) for m in (model, fp)]
    model.eval()
    fp.eval()

    t0 = time.time()
    flags = [(p, p.requires_grad) for m in (model, fp) for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    engine = None
    record = ReconRecord(cfg.method, cfg.to_dict(), [[u.name for u in level] for level in levels])
    flat = [(li, ui, u) for li, level in enumerate(levels) for ui, u in enumerate(level)]
    total = len(flat) + (1 if cfg.head_iters else 0)  # the head's step counts as the last unit
    done = 0
    try:
        engine = _Engine(model, fp, levels, images, cfg, progress)
        if resumed is not None:
            try:
                model.load_state_dict(resumed["state_dict"], strict=True)
            except RuntimeError as exc:
                raise FastquantError(f"the state in {checkpoint.path} does not fit this model: "
                                     f"{str(exc).splitlines()[0]}") from None
            done = int(resumed["done"])
            for _, _, u in flat[:done]:
                engine.state.mark_trained(unit_modules(model, u))
            record.units = [UnitRecord(**u) for u in resumed["record"]["units"]]
            record.resumed_from = done
        engine.check_float_weights()
        if cfg.head_iters:
            quantized_head(model)  # refused now, not after the units have trained
        if cfg.round_start == "gptq":  # also on resume, for blend(); the saved state holds the rounding
            engine.start_rounding_from_gptq(restart=resumed is None)
        stream, ran = None, 0
        for k in range(done, len(flat)):
            if max_units is not None and ran >= max_units:
                break
            li, ui, unit = flat[k]
            if stream is None or stream.level != li or stream.at > unit.start:
                stream = engine.start_stream(li)
            engine.advance(stream, unit.start)
            label = f"L{li} {unit.name} ({k + 1}/{len(flat)})"
            trained = {p for _, _, u in flat[:k] for p in range(u.start, u.end)}  # halves already reconstructed
            rec = engine.train_unit(li, ui, unit, stream, trained, label)
            record.units.append(rec)
            done, ran = k + 1, ran + 1
            if checkpoint is not None:
                record.complete = done == total
                checkpoint.save(model.state_dict(), done, record.to_dict())
            if on_unit is not None:
                on_unit(rec)
        if done == len(flat) < total and (max_units is None or ran < max_units):
            rec = engine.train_head(stream, f"head ({total}/{total})")
            record.units.append(rec)
            done, ran = total, ran + 1
            if checkpoint is not None:
                record.complete = True
                checkpoint.save(model.state_dict(), done, record.to_dict())
            if on_unit is not None:
                on_unit(rec)
        record.complete = done == total
    finally:
        if engine is not None:
            engine.state.write_back()
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in was_training:
            m.train(training)
    record.seconds = round(time.time() - t0, 2)
    return record


def run_method(model_fp: nn.Module, qmodel: nn.Module, calib_images: torch.Tensor, method: str,
               recon_cfg: ReconConfig | None = None, state_dir=None, resume: bool = False, progress: bool = True,
               **kwargs) -> ReconRecord:
    """Reconstruct ``qmodel`` in place with ``method`` (a registered method: brecq, qdrop,
    pfcr, mgrq, or one of yours): the method's schedule and defaults applied to
    ``recon_cfg``, targets from ``model_fp``. Other keyword arguments go to
    :func:`reconstruct`."""
    cfg = dataclasses.replace(recon_cfg or ReconConfig(method=method), method=method)
    return reconstruct(qmodel, schedule_for(qmodel, cfg), calib_images, cfg, fp_model=model_fp,
                       state_dir=state_dir, resume=resume, progress=progress, **kwargs)


def hard_codes(model: nn.Module) -> dict:
    """{layer name: integer weight codes} of every QuantLinear, for comparisons."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            wq = m.weight_quant
            codes = wq.hard_codes() if isinstance(wq, AdaRoundWeight) else wq.quantize(m.weight.detach())
            out[name] = codes.to(torch.uint8)
    return out
