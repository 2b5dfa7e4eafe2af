"""The reconstruction engine on vit-tiny-fmnist: schedules, learnable state, methods,
write-back, resume, bad input. Few images and steps, so the file runs in seconds."""
import copy
import os
import shutil

import pytest
import torch

import fastquant
from fastquant import recon
from fastquant.evaluate import evaluate
from fastquant.nn import QuantLinear
from fastquant.ops import grid_linear
from fastquant.quant import fake_quant_uniform
from fastquant.quant import LsqGrid, beta_at, keep_mask
from fastquant.recon import LearnableState

N_CALIB = 32
# RepQ's calibration with round-to-nearest weights and no bias correction: the float
# weights are AdaRound's starting point.
BASE = fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn", calib="mse", softmax="auto", reparam=True)


@pytest.fixture(scope="module")
def w4a4(tiny, tiny_data):
    """(float model, calibrated W4A4 model, calibration images)."""
    model, _, _ = tiny
    calib = tiny_data[0][:N_CALIB]
    q = fastquant.quantize(model, calib, BASE, progress=False)
    return model, q, calib


def fast(**kw) -> recon.ReconConfig:
    return recon.ReconConfig(**{"iters": 12, "batch_size": 8, "capture_batch_size": 16, **kw})


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- schedules ----------------------------------------------------------------------------
def test_pfcr_levels_fine_to_coarse(tiny):
    model, _, _ = tiny
    names = [[u.name for u in level] for level in recon.pfcr_levels(model)]
    assert names == [["attn0", "mlp0", "attn1", "mlp1", "attn2", "mlp2", "attn3", "mlp3"],
                     ["block0", "block1", "block2", "block3"], ["blocks0-1", "blocks2-3"], ["blocks0-3"]]
    assert [[u.name for u in lv] for lv in recon.pfcr_levels(model, merge=4)] == [
        names[0], ["blocks0-1", "blocks2-3"], ["blocks0-3"]]
    assert [len(lv) for lv in recon.pfcr_levels(model, merge=3)] == [8, 3, 1]
    assert recon.pfcr_levels(model, merge=3)[1][0].name == "attn0..attn1"
    assert len(recon.pfcr_levels(model, stop_at=1)) == 2
    assert len(recon.pfcr_levels(model, stop_at=0)) == 1
    assert [u.name for u in recon.block_units(model)] == ["block0", "block1", "block2", "block3"]
    units = [u for lv in recon.pfcr_levels(model) for u in lv]
    assert all(recon.unit_by_name(model, u.name) == u for u in units)


@pytest.mark.parametrize("name", ["block4", "attn9", "mlp4", "blocks3-1", "blocks2-7", "head", "attn1..attn0", "block"])
def test_unknown_unit_is_an_error(tiny, name):
    model, _, _ = tiny
    with pytest.raises(fastquant.FastquantError, match="unknown unit"):
        recon.schedule_from_names(model, [["attn0", name]])


def test_reconstruct_refuses_a_schedule_with_a_missing_unit(w4a4, tmp_path):
    model, q, calib = w4a4
    q = copy.deepcopy(q)
    with pytest.raises(fastquant.FastquantError, match="unknown unit 'block9'"):
        recon.reconstruct(q, [["block0", "block9"]], calib, fast(), fp_model=model, state_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists() and state_equal(q.state_dict(), w4a4[1].state_dict())


def test_bad_schedules(tiny):
    model, _, _ = tiny
    for bad in ([], [[]], "block0", [["block0"], []]):
        with pytest.raises(fastquant.FastquantError, match="schedule"):
            recon.schedule_from_names(model, bad)
    with pytest.raises(fastquant.FastquantError, match="merge"):
        recon.pfcr_levels(model, merge=1)
    with pytest.raises(fastquant.FastquantError, match="needs a timm VisionTransformer"):
        recon.find_vit(torch.nn.Linear(2, 2))


def test_units_compose_to_the_model(w4a4):
    """Embedding, units and the rest of the model give the model's own logits, exactly."""
    model, q, calib = w4a4
    x = calib[:4]
    with torch.no_grad():
        for m in (model, q):
            tokens = recon.embed(m, x)
            for unit in recon.pfcr_levels(m)[0][:3]:
                tokens = recon.run_unit(m, tokens, unit)
            assert torch.equal(recon.run_rest(m, tokens, 3), m(x))


# -- learnable state ----------------------------------------------------------------------
def test_adaround_starts_at_the_float_weight_and_rtn(w4a4):
    _, q, _ = w4a4
    q = copy.deepcopy(q)
    layer = q.blocks[1].mlp.fc1
    rtn = layer.weight_quant(layer.weight).detach()
    state = LearnableState([q.blocks[1]])
    ada = state.weights[layer]
    assert isinstance(layer.input_quant, recon.ActQuant) and len(state.weights) == 4
    ada.soft = True
    s, z, qmax = ada.quantizer.scale, ada.quantizer.zero_point, ada.quantizer.qmax
    inside = ((layer.weight / s + z) >= 0) & ((layer.weight / s + z) <= qmax)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(ada(layer.weight)[inside], layer.weight[inside], rtol=0, atol=1e-6)
    ada.soft = False
    assert torch.equal(ada(layer.weight).detach(), rtn)


def test_gptq_round_start_begins_at_gptqs_rounding(w4a4):
    """round_start="gptq": the learned rounding starts as GPTQ's (computed here from
    calibration's own input statistics); with learning rates too small to move it, the
    written-back weights are GPTQ's, where the default start gives round-to-nearest."""
    from fastquant.calib import linear_input_stats
    from fastquant.quant import gptq_round

    model, q0, calib = w4a4
    ref = copy.deepcopy(q0)
    fc1 = ref.blocks[1].mlp.fc1
    nearest = fc1.weight_quant(fc1.weight).detach()
    st = linear_input_stats(ref, [calib], covariance={fc1}, progress=False)[fc1]  # leaves quantizers off
    expect = gptq_round(fc1.weight, fc1.weight_quant, st.second_moment())
    assert (expect != nearest).float().mean() > 0.05
    out = {}
    for start in ("gptq", "nearest"):
        q = copy.deepcopy(q0)
        cfg = fast(method="brecq", round_start=start, iters=2, lr_round=1e-12, lr_act=1e-12, round_weight=0.0)
        recon.reconstruct(q, [["mlp1"]], calib, cfg, fp_model=model, progress=False)
        out[start] = q.blocks[1].mlp.fc1.weight.detach()
        assert torch.equal(q.blocks[0].mlp.fc1.weight, q0.blocks[0].mlp.fc1.weight)  # not in the schedule
    assert (out["gptq"] == expect).float().mean() > 0.999
    assert (out["nearest"] == nearest).float().mean() > 0.999


def test_write_back_reproduces_the_hard_rounding(w4a4):
    """After write-back the plain quantizers give exactly the wrapped model's output."""
    _, q, calib = w4a4
    q = copy.deepcopy(q)
    state = LearnableState(list(q.blocks))
    state.mark_trained(list(q.blocks))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ada in state.weights.values():
            ada.alpha.add_(torch.randn(ada.alpha.shape, generator=g))  # flip many roundings away from RTN
        for _, _, act in state.acts:
            if act.scale is not None:
                act.scale.mul_(1.1)
        wrapped = q(calib[:8])
        codes = recon.hard_codes(q)
    state.write_back()
    assert not any(isinstance(m, (recon.AdaRoundWeight, recon.ActQuant)) for m in q.modules())
    with torch.no_grad():
        assert torch.equal(q(calib[:8]), wrapped)
    after = recon.hard_codes(q)
    assert all(torch.equal(codes[k], after[k]) for k in codes)
    rtn_changed = sum(int((codes[k] != recon.hard_codes(w4a4[1])[k]).sum()) for k in codes)
    assert rtn_changed > 1000


def test_beta_schedule():
    assert beta_at(0, 100, 0.2, (20.0, 2.0)) is None and beta_at(19, 100, 0.2, (20.0, 2.0)) is None
    assert beta_at(20, 100, 0.2, (20.0, 2.0)) == 20.0
    assert beta_at(99, 100, 0.2, (20.0, 2.0)) == pytest.approx(2.0 + 18.0 / 80)


# -- the engine ---------------------------------------------------------------------------
def test_qdrop_lowers_every_unit_loss_and_writes_back(w4a4, tiny_data, tmp_path):
    model, q0, calib = w4a4
    q = copy.deepcopy(q0)
    probe = calib[:8]
    seen = {}

    def on_unit(rec):
        if rec.name == "block3":
            with torch.no_grad():
                seen["wrapped"] = q(probe)

    cfg = fast(iters=40)
    record = recon.run_method(model, q, calib, "qdrop", cfg, progress=False, on_unit=on_unit)
    assert record.complete and [u.name for u in record.units] == ["block0", "block1", "block2", "block3"]
    for u in record.units:
        assert len(u.history) == 40 and u.loss_first == 1.0
        assert u.mse_after < u.mse_before, u
    assert sum(u.mse_after for u in record.units) < 0.8 * sum(u.mse_before for u in record.units)
    assert not any(isinstance(m, (recon.AdaRoundWeight, recon.ActQuant)) for m in q.modules())
    assert [p.requires_grad for p in q.parameters()] == [p.requires_grad for p in q0.parameters()]
    with torch.no_grad():
        assert torch.equal(q(probe), seen["wrapped"])
        # Block weights sit on their quantization grid: fake-quantizing them changes nothing.
        for m in q.blocks.modules():
            if isinstance(m, QuantLinear):
                assert torch.equal(m.weight_quant(m.weight), m.weight)
    # Saved with integer weights and loaded again, the reconstructed model is the same.
    loaded = fastquant.load(fastquant.save(q, tmp_path / "q.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(probe), seen["wrapped"])
    fp_acc = evaluate(model, tiny_data[1], 300, progress=False)
    assert evaluate(q, tiny_data[1], 300, progress=False) > fp_acc - 10


def test_float_reference_defaults_to_the_model_with_quantizers_off(w4a4):
    model, _, calib = w4a4
    rtn = fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn")
    q = fastquant.quantize(model, calib, rtn, progress=False)
    unit = recon.reconstruct(q, [["block1"]], calib, fast(), progress=False).units[0]
    assert unit.name == "block1" and unit.mse_after < unit.mse_before
    if "bias_correct" in fastquant.QuantConfig.__dataclass_fields__:
        cfg = fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn", bias_correct=True)
        q = fastquant.quantize(model, calib, cfg, progress=False)
        with pytest.raises(fastquant.FastquantError, match="pass fp_model"):
            recon.reconstruct(q, [["block1"]], calib, fast(), progress=False)


def test_methods_are_configurations(w4a4):
    model, q0, calib = w4a4
    assert recon.ReconConfig(method="brecq").resolved("qdrop_p") == 0.0
    assert recon.ReconConfig(method="pfcr").resolved("pos") is False  # measured better (methods/pfcr.py)
    assert recon.ReconConfig(method="pfcr", pos=True).resolved("pos") is True
    assert recon.ReconConfig(method="pfcr").resolved("anneal") == "levels"
    assert recon.ReconConfig(method="pfcr").resolved("carry") == 1.0
    assert recon.ReconConfig(method="pfcr").resolved("qdrop_p") == 0.0
    assert recon.ReconConfig(method="mgrq").resolved("w_global") > 0
    assert recon.ReconConfig(iters=20000).resolved("lr_round") == 1e-3
    assert recon.ReconConfig(iters=300).resolved("lr_round") == pytest.approx(1e-3 * 20000 / 300)
    assert recon.ReconConfig(iters=10).resolved("lr_round") == 0.1
    assert recon.ReconConfig(iters=300, lr_act=None).resolved("lr_act") == pytest.approx(4e-5 * 20000 / 300)
    assert recon.ReconConfig(iters=20000, lr_act=None).resolved("lr_act") == 4e-5
    assert recon.ReconConfig(iters=10, lr_act=None).resolved("lr_act") == 1e-2

    q = copy.deepcopy(q0)
    pfcr = recon.run_method(model, q, calib, "pfcr", fast(iters=6, stop_at=1, pos=True), progress=False)
    assert [u.name for u in pfcr.units][:3] == ["attn0", "mlp0", "attn1"] and len(pfcr.units) == 12
    # POS: the activations turn quantized half-way, and the losses are normalised afresh.
    assert all(u.history[0] == 1.0 and u.history[3] == 1.0 for u in pfcr.units)
    q = copy.deepcopy(q0)
    acts_first = recon.run_method(model, q, calib, "pfcr", fast(iters=6, stop_at=0, pos=True, pos_mode="acts_first"),
                                  progress=False)
    assert len(acts_first.units) == 8 and all(u.history[3] == 1.0 for u in acts_first.units)

    for kw in (dict(), dict(global_form="kl", global_rest="float", local_loss="mse", global_batch=3),
               dict(global_form="kl"), dict(fisher_samples=1)):
        q = copy.deepcopy(q0)
        mgrq = recon.run_method(model, q, calib, "mgrq", fast(iters=4, **kw), progress=False)
        cfg = fast(method="mgrq", iters=4, **kw)
        # each term is normalised to 1 at the first step, so the first loss is 1 + the two weights
        first = 1.0 + cfg.resolved("w_global") + cfg.resolved("w_local")
        assert mgrq.complete and all(u.mse_after < u.mse_before and u.history[0] == pytest.approx(first)
                                     for u in mgrq.units)


def test_fisher_global_term_weighs_what_the_prediction_reads(w4a4):
    """The Fisher form's weights: at the last block only the class token counts for a head
    that reads it (its gradient elsewhere is exactly 0), and the sampled estimate follows the
    exact diagonal (the expectation over every class) element by element."""
    from types import SimpleNamespace
    import torch.nn.functional as F
    from fastquant.adapters import run_rest
    from fastquant.recon.losses import GlobalFisher, StepBatch

    model, q0, calib = w4a4
    fp = recon.float_copy(q0)
    unit = recon.unit_by_name(q0, "block3")
    with torch.no_grad():
        target = recon.run_span(fp, recon.embed(fp, calib[:8]), 0, unit.end)

    def ctx(samples, pool="none"):
        return SimpleNamespace(target=target, cfg=fast(method="mgrq", global_form="fisher", fisher_samples=samples,
                                                        fisher_pool=pool),
                               device=target.device, fp=fp, unit=unit, level=1, index=3)

    w = GlobalFisher(ctx(400)).weights
    assert w.shape == target.shape and w.mean().item() == pytest.approx(1.0)
    assert torch.all(w[:, 1:] == 0) and w[:, 0].min() > 0
    z = target.clone().requires_grad_(True)
    logp = F.log_softmax(run_rest(fp, z, unit), -1)
    exact = torch.zeros_like(z)
    for y in range(logp.shape[1]):
        (g,) = torch.autograd.grad(logp[:, y].sum(), z, retain_graph=True)
        exact += logp[:, y].detach().exp()[:, None, None] * g.pow(2)
    exact = exact / exact.mean()
    corr = torch.corrcoef(torch.stack([w[:, 0].flatten(), exact[:, 0].flatten()]))[0, 1]
    assert corr > 0.95
    # the term: the weighted squared error, 0 for the float output itself
    term = GlobalFisher(ctx(1))
    idx = torch.arange(4)
    assert term.value(target[:4], StepBatch(idx, target[:4], target[:4])).item() == 0
    noisy = target[:4] + 0.1
    assert term.value(noisy, StepBatch(idx, target[:4], target[:4])).item() == pytest.approx(
        (term.weights[:4] * 0.01).mean().item(), rel=1e-4)
    # fisher_pool="images" (MGRQ's default): the same estimate averaged over the images, one weight per
    # token and channel
    assert fast(method="mgrq").resolved("fisher_pool") == "images" and fast().resolved("fisher_pool") == "none"
    pooled = GlobalFisher(ctx(1, "images"))
    assert pooled.weights.shape == (1, *target.shape[1:])
    torch.testing.assert_close(pooled.weights[0], term.weights.mean(0) / term.weights.mean())
    err = torch.zeros_like(target[:4])
    err[2, 0, 5] = 0.3  # one element of image 2: weighted by its token's and channel's pooled weight
    got = pooled.value(target[:4] + err, StepBatch(torch.tensor([7, 1, 3, 0]), target[:4], target[:4])).item()
    assert got == pytest.approx(pooled.weights[0, 0, 5].item() * 0.09 / err.numel(), rel=1e-4)


def test_float_parameters_train_only_when_asked(w4a4):
    """lr_bias / lr_norm train the unit's Linear biases / LayerNorm affine, nothing else;
    at 0 (the default) they stay as calibrated."""
    model, q0, calib = w4a4

    def floats(q, block):
        b = q.blocks[block]
        return {"bias": torch.cat([m.bias for m in b.modules() if isinstance(m, QuantLinear)]),
                "norm": torch.cat([b.norm1.weight, b.norm1.bias, b.norm2.weight, b.norm2.bias])}

    q = copy.deepcopy(q0)
    recon.run_method(model, q, calib, "qdrop", fast(), progress=False, max_units=1)
    assert all(torch.equal(v, floats(q0, 0)[k]) for k, v in floats(q, 0).items())
    for kw, moved in ((dict(lr_bias=1e-2), "bias"), (dict(lr_norm=1e-2), "norm")):
        q = copy.deepcopy(q0)
        recon.run_method(model, q, calib, "qdrop", fast(**kw), progress=False, max_units=1)
        now, before = floats(q, 0), floats(q0, 0)
        assert not torch.equal(now[moved], before[moved])
        assert all(torch.equal(now[k], before[k]) for k in now if k != moved)
        assert all(torch.equal(v, floats(q0, 1)[k]) for k, v in floats(q, 1).items())  # block 1 not trained


def test_head_term_joins_only_the_last_unit(w4a4):
    """w_head adds the logits' KL to the unit that ends at the last block and to no other;
    off (0, the default) it changes nothing."""
    model, q0, calib = w4a4
    depth = len(q0.blocks)
    runs = {}
    for name, kw in (("off", {}), ("head", dict(w_head=1.0))):
        q = copy.deepcopy(q0)
        runs[name] = recon.run_method(model, q, calib, "brecq", fast(**kw), progress=False).units
    assert len(runs["off"]) == depth
    for a, b in zip(runs["off"][:-1], runs["head"][:-1]):
        assert a.history == b.history
    last_off, last_head = runs["off"][-1], runs["head"][-1]
    # The loss at the first step is each term normalised to 1: one term without, two with.
    assert last_off.history[0] == pytest.approx(1.0) and last_head.history[0] == pytest.approx(2.0)
    assert last_head.history != last_off.history
    with pytest.raises(fastquant.FastquantError, match="w_head must be a non-negative"):
        fast(w_head=-1.0)


def test_schedules_of_lr_and_qdrop(w4a4):
    from fastquant.recon.engine import qdrop_at

    cfg = fast(iters=10, qdrop_schedule="linear")
    assert [qdrop_at(cfg, 0.5, it) for it in (0, 5, 9)] == [0.5, 0.25, pytest.approx(0.05)]
    assert qdrop_at(fast(iters=10), 0.5, 9) == 0.5
    assert qdrop_at(fast(method="mgrq", iters=10), 0.5, 5) == 0.25  # mgrq's default: linear
    assert qdrop_at(fast(method="mgrq", iters=10, qdrop_schedule="constant"), 0.5, 5) == 0.5
    for bad in (dict(lr_schedule="step"), dict(qdrop_schedule="cosine")):
        with pytest.raises(fastquant.FastquantError, match="must be one of"):
            fast(**bad)
    model, q0, calib = w4a4
    runs = {}
    for name, kw in (("default", {}), ("constant", dict(lr_schedule="constant", qdrop_schedule="constant")),
                     ("cosine", dict(lr_schedule="cosine", lr_act=1e-2)), ("plain", dict(lr_act=1e-2)),
                     ("linear", dict(qdrop_schedule="linear"))):
        q = copy.deepcopy(q0)
        runs[name] = recon.run_method(model, q, calib, "qdrop", fast(**kw), progress=False, max_units=1).units[0]
    assert runs["default"].history == runs["constant"].history
    assert runs["cosine"].history != runs["plain"].history
    assert runs["linear"].history != runs["default"].history


def test_pfcr_anneals_across_levels_when_asked(w4a4):
    """anneal="levels" (the default): one regulariser schedule over all levels (unit of level
    k starts k/L of the way); "unit": each unit its own."""
    from types import SimpleNamespace

    from fastquant.recon.methods.pfcr import round_window

    def ctx(level, **kw):
        cfg = fast(method="pfcr", iters=10, **kw)
        return SimpleNamespace(cfg=cfg, level=level, engine=SimpleNamespace(n_levels=3, cfg=cfg))

    assert [round_window(ctx(k, anneal="unit"), 10) for k in range(3)] == [(0, 10)] * 3
    assert [round_window(ctx(k), 10) for k in range(3)] == [(0, 30), (10, 30), (20, 30)]
    with pytest.raises(fastquant.FastquantError, match="anneal must be one of"):
        fast(method="pfcr", anneal="never")
    model, q0, calib = w4a4
    runs = {}
    for anneal in ("unit", "levels"):
        q = copy.deepcopy(q0)
        cfg = fast(method="pfcr", iters=6, stop_at=1, carry=1.0, anneal=anneal, pos=False, warmup=0.6)
        runs[anneal] = recon.run_method(model, q, calib, "pfcr", cfg, progress=False)
        assert runs[anneal].complete and len(runs[anneal].units) == 12
    # Two levels of 6 steps: the shared schedule's warm-up (0.6 of 12 steps) outlasts level 0.
    assert all(u.round_reg_last == 0.0 for u in runs["levels"].units[:8])
    assert any(u.round_reg_last > 0 for u in runs["unit"].units[:8])


def test_pfcr_level_steps_shorten_the_coarse_levels(w4a4):
    """level_steps: each level's steps per unit as fractions of iters (the last repeated), at
    the run's learning rates, with the shared regulariser schedule spanning the levels' own
    lengths."""
    from types import SimpleNamespace

    from fastquant.recon.methods.pfcr import level_iters, round_window

    cfg = fast(method="pfcr", iters=10, level_steps=(1.0, 0.5))
    assert [level_iters(cfg, k) for k in range(3)] == [10, 5, 5]
    assert [level_iters(fast(method="pfcr", iters=10), k) for k in range(3)] == [10, 10, 10]
    engine = SimpleNamespace(n_levels=3, cfg=cfg)
    windows = [round_window(SimpleNamespace(cfg=cfg.with_iters(level_iters(cfg, k)), level=k, engine=engine), 0)
               for k in range(3)]
    assert windows == [(0, 20), (10, 20), (15, 20)]
    # POS weights_first keeps every step a rounding step; acts_first leaves only the second stage's.
    acts_first = fast(method="pfcr", iters=10, level_steps=(1.0, 0.5), pos=True, pos_mode="acts_first")
    engine = SimpleNamespace(n_levels=2, cfg=acts_first)
    assert round_window(SimpleNamespace(cfg=acts_first, level=1, engine=engine), 0) == (5, 8)
    # The shorter level keeps the run's learning rates (not those auto-scaled for fewer steps).
    long = fast(method="pfcr", iters=300)
    short = long.with_iters(150)
    assert short.iters == 150 and short.options == long.options
    assert (short.resolved("lr_round"), short.resolved("lr_act")) == (long.resolved("lr_round"), long.resolved("lr_act"))
    assert recon.ReconConfig("pfcr", iters=150).resolved("lr_round") != long.resolved("lr_round")
    for bad in ((0.0,), (1.5,), (), "0.5", (float("nan"),)):
        with pytest.raises(fastquant.FastquantError, match="level_steps must be None or a sequence of fractions"):
            fast(method="pfcr", level_steps=bad)
    model, q0, calib = w4a4
    run = recon.run_method(model, copy.deepcopy(q0), calib, "pfcr",
                           fast(method="pfcr", iters=6, stop_at=1, level_steps=(1.0, 0.5)), progress=False)
    assert run.complete
    assert [(u.level, u.iters, len(u.history)) for u in run.units] == [(0, 6, 6)] * 8 + [(1, 3, 3)] * 4


@pytest.mark.parametrize("start", ["nearest", "gptq"])
def test_resume_gives_the_uninterrupted_result(w4a4, tmp_path, start):
    model, q0, calib = w4a4
    cfg = fast(iters=5, stop_at=1, round_start=start)
    whole = copy.deepcopy(q0)
    full = recon.run_method(model, whole, calib, "pfcr", cfg, state_dir=tmp_path / "a", progress=False)

    part = copy.deepcopy(q0)
    first = recon.run_method(model, part, calib, "pfcr", cfg, state_dir=tmp_path / "b", progress=False, max_units=5)
    assert not first.complete and len(first.units) == 5
    assert not any(isinstance(m, recon.AdaRoundWeight) for m in part.modules())  # usable as it stands
    # Units 0-4 (attn0 .. attn2) are written back; layers no unit reached keep their weights.
    assert not torch.equal(part.blocks[0].attn.qkv.weight, q0.blocks[0].attn.qkv.weight)
    assert torch.equal(part.blocks[2].mlp.fc1.weight, q0.blocks[2].mlp.fc1.weight)
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = copy.deepcopy(q0)
    second = recon.run_method(model, resumed, calib, "pfcr", cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert second.complete and second.resumed_from == 5
    assert [u.name for u in second.units] == [u.name for u in full.units]
    png = recon.plot_losses(second, tmp_path / "losses.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [u.history for u in second.units] == [u.history for u in full.units]
    assert state_equal(resumed.state_dict(), whole.state_dict())
    # Resuming into the model the interrupted run returned works as well.
    recon.run_method(model, part, calib, "pfcr", cfg, state_dir=tmp_path / "c", resume=True, progress=False)
    assert state_equal(part.state_dict(), whole.state_dict())
    assert not state_equal(resumed.state_dict(), q0.state_dict())


@pytest.mark.parametrize("schedule", [["block3"], ["mlp1"]])
def test_head_iters_trains_the_heads_input_step(w4a4, schedule):
    """head_iters: after the units, the classifier head's input step is trained against the
    float logits (on the final tokens: the stream's after block3, a fresh pass after mlp1),
    recorded as a unit named "head" whose logits' MSE falls; nothing else changes."""
    model, q0, calib = w4a4
    plain, headed = copy.deepcopy(q0), copy.deepcopy(q0)
    # all 32 images in every batch, a small step: the head's loss falls step by step
    cfg = dict(method="brecq", lr_act=1e-3, batch_size=32)
    ra = recon.reconstruct(plain, [schedule], calib, fast(**cfg), fp_model=model, progress=False)
    rb = recon.reconstruct(headed, [schedule], calib, fast(**cfg, head_iters=40), fp_model=model, progress=False)
    assert [u.name for u in ra.units] == schedule
    assert [u.name for u in rb.units] == schedule + ["head"] and rb.complete
    head = rb.units[-1]
    with torch.no_grad():
        expect = (plain(calib) - model(calib)).double().pow(2).mean().item()
    assert head.mse_before == pytest.approx(expect, rel=1e-4)  # the plain run's logits
    assert head.mse_after < head.mse_before and len(head.history) == 40
    sa, sb = plain.state_dict(), headed.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == ["head.input_quant.scale"]


def test_head_iters_resumes_and_refuses_an_unquantized_head(w4a4, tmp_path):
    model, q0, calib = w4a4
    cfg = fast(method="brecq", iters=4, head_iters=6)
    whole = copy.deepcopy(q0)
    full = recon.run_method(model, whole, calib, "brecq", cfg, state_dir=tmp_path / "a", progress=False)
    assert [u.name for u in full.units] == ["block0", "block1", "block2", "block3", "head"]
    part = copy.deepcopy(q0)
    first = recon.run_method(model, part, calib, "brecq", cfg, state_dir=tmp_path / "b", progress=False, max_units=4)
    assert not first.complete and len(first.units) == 4
    resumed = copy.deepcopy(q0)
    second = recon.run_method(model, resumed, calib, "brecq", cfg, state_dir=tmp_path / "b", resume=True,
                              progress=False)
    assert second.complete and second.resumed_from == 4 and [u.history for u in second.units] == [
        u.history for u in full.units]
    assert state_equal(resumed.state_dict(), whole.state_dict())
    again = copy.deepcopy(q0)  # a finished run resumed: the saved state, nothing trained twice
    third = recon.run_method(model, again, calib, "brecq", cfg, state_dir=tmp_path / "b", resume=True,
                             progress=False)
    assert third.complete and third.resumed_from == 5 and state_equal(again.state_dict(), whole.state_dict())
    bare = copy.deepcopy(q0)
    bare.head.input_quant = None
    before = copy.deepcopy(bare.state_dict())
    with pytest.raises(fastquant.FastquantError, match="head_iters: the model's classifier"):
        recon.run_method(model, bare, calib, "brecq", cfg, progress=False)
    assert state_equal(bare.state_dict(), before)  # refused before any unit trained


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(w_rec=-1.0), "w_rec must be a non-negative"),
    (dict(method="mgrq", w_global=-0.5), "w_global must be a non-negative"),
    (dict(method="mgrq", w_local=float("nan")), "w_local must be a non-negative"),
    (dict(method="brecq", w_rec=0.0), "all zero"),
    (dict(method="mgrq", w_rec=0.0, w_global=0.0, w_local=0.0), "all zero"),
    (dict(method="gptq"), "unknown reconstruction method"),
    (dict(iters=0), "iters must be a positive integer"),
    (dict(qdrop_p=1.5), "qdrop_p"),
    (dict(beta=(2.0, 20.0)), "beta"),
    (dict(warmup=1.0), "warmup"),
    (dict(matmul_dtype="float16"), "matmul_dtype"),
    (dict(head_iters=-1), "head_iters must be a non-negative integer"),
    (dict(head_iters=2.5), "head_iters must be a non-negative integer"),
    (dict(global_form="exact"), "global_form must be one of kl, fisher"),
    (dict(fisher_samples=0), "fisher_samples must be a positive integer"),
    (dict(fisher_pool="tokens"), "fisher_pool must be one of none, images"),
    (dict(round_start="adaround"), "round_start must be one of nearest, gptq"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(fastquant.FastquantError, match=match):
        recon.ReconConfig(**kwargs)


def test_refuses_weights_already_on_the_grid(w4a4):
    model, q0, calib = w4a4
    q = copy.deepcopy(q0)
    with torch.no_grad():
        fc2 = q.blocks[2].mlp.fc2
        fc2.weight.copy_(fc2.weight_quant(fc2.weight))  # as GPTQ leaves them
    with pytest.raises(fastquant.FastquantError, match="blocks.2.mlp.fc2 are already rounded"):
        recon.run_method(model, q, calib, "qdrop", fast(), progress=False)
    assert not any(isinstance(m, recon.AdaRoundWeight) for m in q.modules())


def test_bad_calibration_images(w4a4):
    model, q, calib = w4a4
    bad = calib[:4].clone()
    bad[0, 0, 0, 0] = float("nan")
    for images, match in ((bad, "NaN"), (calib[:0], "non-empty"), (calib[0], "non-empty"), ([calib], "tensor")):
        with pytest.raises(fastquant.FastquantError, match=match):
            recon.run_method(model, copy.deepcopy(q), images, "qdrop", fast(), progress=False)


def test_resume_refuses_another_run_and_overwrites_nothing(w4a4, tmp_path):
    model, q0, calib = w4a4
    state = tmp_path / "state"
    recon.run_method(model, copy.deepcopy(q0), calib, "qdrop", fast(iters=2), state_dir=state, progress=False,
                     max_units=1)
    path = state / "recon_state.pt"
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    q = copy.deepcopy(q0)
    for method, cfg, match in (("qdrop", fast(iters=3), "recon_config"), ("brecq", fast(iters=2), "recon_config"),
                               ("pfcr", fast(iters=2), "recon_config, schedule")):
        with pytest.raises(fastquant.FastquantError, match=match):
            recon.run_method(model, q, calib, method, cfg, state_dir=state, resume=True, progress=False)
    with pytest.raises(fastquant.FastquantError, match="calibration"):
        recon.run_method(model, q, calib[:16], "qdrop", fast(iters=2), state_dir=state, resume=True, progress=False)
    with pytest.raises(fastquant.FastquantError, match="needs the state dir"):
        recon.run_method(model, q, calib, "qdrop", fast(iters=2), resume=True, progress=False)
    with pytest.raises(fastquant.FastquantError, match="already holds"):
        recon.run_method(model, q, calib, "qdrop", fast(iters=2), state_dir=state, progress=False)
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    assert state_equal(q.state_dict(), q0.state_dict())
    assert not any(isinstance(m, (recon.AdaRoundWeight, recon.ActQuant)) for m in q.modules())


# -- the integer-grid training path ----------------------------------------------------------
@pytest.mark.parametrize("drop", [False, True])
def test_lsq_grid_matches_autograd_of_the_plain_ops(drop):
    """LsqGrid's hand-written backward equals autograd through fake_quant_uniform and torch.where."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 50, generator=gen) * 3).requires_grad_()
    s = torch.tensor(0.4, requires_grad=True)
    z, qmax = torch.tensor(7.0), 15
    keep = (torch.rand(6, 50, generator=gen) < 0.5).float() if drop else None
    g = LsqGrid.apply(x, s, z, qmax, keep)
    ref = fake_quant_uniform(x, s, z, qmax)
    if drop:
        ref = torch.where(keep.bool(), x, ref)
    torch.testing.assert_close(g * s, ref, rtol=0, atol=1e-6)
    w = torch.randn(6, 50, generator=gen)
    gx, gs = torch.autograd.grad((g * s * w).sum(), (x, s))
    rx, rs = torch.autograd.grad((ref * w).sum(), (x, s))
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gs, rs, rtol=1e-5, atol=1e-6)
    assert 0 < (gx == 0).float().mean() < 0.5  # some elements are clipped, most pass


def test_keep_mask_rate_and_reproducibility():
    x = torch.zeros(1000, 99)
    a = keep_mask(x, 0.5, torch.Generator().manual_seed(3))
    b = keep_mask(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.5) < 0.01
    assert abs(keep_mask(x, 0.1, None).mean().item() - 0.1) < 0.01
    assert keep_mask(x, 0.0, None).sum() == 0 and keep_mask(x, 1.0, None).min() == 1


def test_grid_linear_is_the_fake_quant_product():
    """On hard-rounded 4-bit operands, bf16 products and their sums are exact; only the
    result is rounded to bf16 (relative error at most 2^-8), then scaled in fp32."""
    gen = torch.Generator().manual_seed(1)
    gx = torch.randint(-8, 8, (2, 65, 384), generator=gen).float()
    gw = torch.randint(-8, 8, (96, 384), generator=gen).float()
    sx, sw, b = torch.tensor(0.03), torch.rand(96, 1, generator=gen) + 0.5, torch.randn(96, generator=gen)
    exact = (gx.double() @ gw.double().t()) * (sx.double() * sw.double().reshape(-1))
    y32 = grid_linear(gx, sx, gw, sw, None, torch.float32)
    y16 = grid_linear(gx, sx, gw, sw, None, torch.bfloat16)
    assert (y32.double() - exact).abs().max() <= 1e-6 * exact.abs().max()
    assert ((y16.double() - exact).abs() <= 2 ** -8 * exact.abs() + 1e-6).all()
    one = torch.tensor(1.0)
    sums = grid_linear(gx, one, gw, one, None, torch.bfloat16)
    assert torch.equal(sums, (gx.double() @ gw.double().t()).float().bfloat16().float())
    torch.testing.assert_close(grid_linear(gx, sx, gw, sw, b, torch.float32), y32 + b)


def test_quant_linear_grid_path_follows_the_wrappers(w4a4):
    """With grid_dtype set, a wrapped QuantLinear gives the fake-quant output (fp32 grids:
    to rounding; bf16: within bf16's rounding of the result) for hard and soft rounding,
    QDrop on or off, and falls back to the plain path when an operand is float."""
    _, q, calib = w4a4
    q = copy.deepcopy(q)
    layer = q.blocks[0].mlp.fc2
    state = LearnableState([q.blocks[0]])
    act = layer.input_quant
    x = torch.randn(4, 17, layer.in_features) * 2
    for soft in (False, True):
        state.weights[layer].soft = soft
        ref = layer(x)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            layer.grid_dtype = dtype
            out = layer(x)
            torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
            layer.grid_dtype = None
    act.float_ = True
    layer.grid_dtype = torch.bfloat16
    assert layer._grid_forward(x) is None
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, state.weights[layer](layer.weight), layer.bias))
    act.float_ = False
    act.drop_p, act.generator = 0.5, torch.Generator().manual_seed(0)
    layer.grid_dtype = torch.float32
    out = layer(x)
    act.generator = torch.Generator().manual_seed(0)
    layer.grid_dtype = None
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5 * out.abs().max().item())


def test_bf16_and_fp32_training_reach_similar_losses(w4a4):
    """The bf16 grid products change the trajectory only slightly (one block, QDrop)."""
    model, q, calib = w4a4
    finals = {}
    for dt in ("float32", "bfloat16"):
        qq = copy.deepcopy(q)
        rec = recon.reconstruct(qq, [["block2"]], calib, fast(iters=40, matmul_dtype=dt), fp_model=model,
                                progress=False)
        u = rec.units[0]
        assert u.mse_after < u.mse_before
        finals[dt] = u.mse_after
    assert abs(finals["bfloat16"] - finals["float32"]) < 0.1 * finals["float32"], finals
