"""Reconstruction methods are registered records: one from outside the package runs through
the same engine, CLI and config as fastquant's own, without editing them."""
import pytest

import fastquant
from fastquant.adapters import Unit, depth_of, half_name
from fastquant.cli import main
from fastquant.recon import (Option, ReconConfig, ReconMethod, Stage, get_method, method_names,
                             register_method, register_option)

CALLS = []


def _halves(model, cfg):
    """Every attention and MLP half, in order: PFCR's level 0 alone."""
    return [[Unit(half_name(p), p, p + 1) for p in range(2 * depth_of(model))]]


def _stages(cfg):
    split = int(cfg.resolved("warm_fraction") * cfg.iters)
    return ([Stage(0, float_acts=True), Stage(split)] if split else [Stage(0)]), 0


@pytest.fixture(scope="module")
def halves():
    """A method of the tests' own: halves, no QDrop, a float-activation warm-up of its own option."""
    if "test-halves" not in method_names():
        register_option(Option("warm_fraction", 0.25,
                               lambda v: "" if isinstance(v, float) and 0 <= v < 1 else
                               f"warm_fraction must be a fraction in [0, 1), got {v!r}",
                               "the steps of each unit with activations in float"))
        register_method(ReconMethod(
            name="test-halves", summary="attention and MLP halves, no QDrop, a float-activation warm-up",
            defaults={"qdrop_p": 0.0}, options={"warm_fraction": 0.25}, schedule=_halves, stages=_stages,
            before_unit=lambda ctx: CALLS.append((ctx.unit.name, sorted(ctx.trained_halves))),
            budgets={"cpu": {"warm_fraction": 0.5}}))
    return get_method("test-halves")


def test_a_method_from_outside_runs_through_the_engine(halves, tiny, tiny_data):
    model, _, _ = tiny
    calib = tiny_data[0][:16]
    cfg = fastquant.QuantConfig(w_bits=4, a_bits=4, method="test-halves")
    assert cfg.reconstructs and cfg.resolved("weight_rounding") == "nearest" and cfg.resolved("reparam")
    CALLS.clear()
    # lr_act pinned: the default scales it with the steps, 1e-2 at 8, too coarse for "every unit
    # ends below where it started" in 16 steps (this test is about the engine, not the rate)
    q = fastquant.quantize(model, calib, cfg, recon=ReconConfig(iters=16, batch_size=8, capture_batch_size=16,
                                                                lr_act=4e-5), progress=False)
    record = fastquant.record_of(q).recon
    names = [f"{kind}{i}" for i in range(4) for kind in ("attn", "mlp")]
    assert record.complete and [u.name for u in record.units] == names
    assert [c[0] for c in CALLS] == names and all(not c[1] for c in CALLS)  # the hook ran before every unit
    assert record.config["warm_fraction"] == 0.25 and record.config["qdrop_p"] == 0.0
    for u in record.units:  # the second stage (step 4) normalises its loss afresh
        assert u.history[0] == 1.0 and u.history[4] == 1.0
    # 16 steps move a unit's error by little: on one thread attn2 ends 0.5% above its start
    # where on two it ends below, so each unit is held to 2% and the units together to a drop
    assert all(u.mse_after < 1.02 * u.mse_before for u in record.units)
    assert sum(u.mse_after for u in record.units) < sum(u.mse_before for u in record.units)


def test_the_cli_takes_a_registered_method_with_its_options_and_budget(halves, capsys, tmp_path):
    out = tmp_path / "r.json"
    code = main(["quantize", "--model", "vit-tiny-fmnist", "--eval-size", "20", "--calib-size", "16",
                 "--method", "test-halves", "--w-bits", "4", "--a-bits", "4", "--iters", "4",
                 "--recon-set", "batch_size=8", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    import json

    result = json.loads(out.read_text())
    assert result["recon_config"]["warm_fraction"] == 0.5  # the method's cpu budget
    assert len(result["recon_units"]) == 8
    code = main(["quantize", "--model", "vit-tiny-fmnist", "--method", "test-halves", "--recon-set",
                 "warm_fraction=2.0"])
    assert code == 2 and "warm_fraction must be a fraction in [0, 1), got 2.0" in capsys.readouterr().err


def test_method_options_are_checked_and_belong_to_their_method(halves):
    assert ReconConfig(method="test-halves", warm_fraction=0.5).resolved("warm_fraction") == 0.5
    with pytest.raises(fastquant.FastquantError, match="unknown reconstruction setting 'warm_fractions'"):
        ReconConfig(method="test-halves", warm_fractions=0.5)
    with pytest.raises(fastquant.FastquantError, match="carry: not an option of method test-halves"):
        ReconConfig(method="test-halves", carry=1.0).check_options_apply()
    with pytest.raises(fastquant.FastquantError, match="warm_fraction: not an option of method qdrop"):
        ReconConfig(method="qdrop", warm_fraction=0.5).check_options_apply()


def test_registering_a_bad_method_is_refused(halves):
    with pytest.raises(fastquant.FastquantError, match="already registered"):
        register_method(ReconMethod(name="test-halves", summary="again"))
    with pytest.raises(fastquant.FastquantError, match="iters are not settings a method sets"):
        register_method(ReconMethod(name="test-bad", summary="", defaults={"iters": 3}))
    with pytest.raises(fastquant.FastquantError, match="options nope are not declared"):
        register_method(ReconMethod(name="test-bad", summary="", options={"nope": 1}))
    assert "test-bad" not in method_names()


def test_fastquant_methods_are_records():
    """brecq, qdrop, pfcr and mgrq differ only in their records' data and functions."""
    assert method_names()[:4] == ("brecq", "qdrop", "pfcr", "mgrq")
    assert get_method("brecq").defaults == {"qdrop_p": 0.0}
    assert get_method("mgrq").defaults == {"qdrop_p": 0.5, "qdrop_schedule": "linear", "w_global": 1.0, "w_local": 0.1,
                                           "global_form": "fisher", "fisher_pool": "images"}
    assert ReconConfig(method="mgrq").resolved("qdrop_schedule") == "linear"
    assert ReconConfig(method="qdrop").resolved("qdrop_schedule") == "constant"
    assert ReconConfig(method="mgrq", qdrop_schedule="constant").resolved("qdrop_schedule") == "constant"
    assert ReconConfig(method="mgrq", iters=300).resolved("w_global") == 1.0  # its own default
    assert ReconConfig(method="mgrq").resolved("global_form") == "fisher"
    assert ReconConfig(method="qdrop").resolved("global_form") == "kl"  # the engine's default
    assert ReconConfig(method="mgrq", iters=300).resolved("lr_act") == pytest.approx(4e-5 * 20000 / 300)
    assert ReconConfig(method="brecq", iters=300).resolved("lr_act") == pytest.approx(4e-5 * 20000 / 300)
    assert ReconConfig(method="mgrq", iters=300, lr_act=1e-3).resolved("lr_act") == 1e-3  # given wins
    pfcr = get_method("pfcr")
    assert set(pfcr.options) == {"pos", "pos_split", "pos_mode", "carry", "anneal", "merge", "level_steps", "stop_at"}
    cfg = ReconConfig(method="pfcr", iters=10, pos=True)
    assert pfcr.stages(cfg) == ([Stage(0, float_acts=True), Stage(5)], 0)
    assert pfcr.stages(ReconConfig(method="pfcr", iters=10)) == ([Stage(0)], 0)  # no POS by default
    assert pfcr.stages(ReconConfig(method="pfcr", iters=10, pos=True, pos_mode="acts_first")) == (
        [Stage(0, float_weights=True), Stage(5)], 5)
    assert pfcr.stages(ReconConfig(method="pfcr", iters=10, pos=False)) == ([Stage(0)], 0)
    assert get_method("qdrop").stages(cfg) == ([Stage(0)], 0)
