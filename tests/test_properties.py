"""Property-based checks (hypothesis): generated bad configs, malformed metadata, corrupted
bytes, odd tensors and bad command lines. Whatever comes in, fastquant answers with a
FastquantError of one line (exit code 2 from the CLI) or a correct result; never another
exception, a traceback, or a partial or changed output file.

Derandomized (the same examples on every run) and sized to run in well under a minute."""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastquant
from fastquant.cli import main
from fastquant.config import methods
from fastquant.models import ModelSpec
from fastquant.recon import ReconConfig

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Values of every kind a config field could be given by mistake.
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["auto", "mse", "minmax", "repq", "rtn", "log2", "True", "4"]),
    st.lists(st.integers(0, 9), max_size=3),
)


def one_line(exc: BaseException) -> bool:
    text = str(exc)
    return bool(text) and "\n" not in text


@pytest.fixture(scope="module")
def saved(tiny, tiny_data, tmp_path_factory):
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib[:16], fastquant.QuantConfig(w_bits=4, a_bits=8, method="rtn"),
                           progress=False)
    path = tmp_path_factory.mktemp("prop") / "q.safetensors"
    fastquant.save(q, path)
    x, _ = test.batch(range(4))
    with torch.no_grad():
        logits = q(x)
    return path, path.read_bytes(), x, logits


# -- configs ---------------------------------------------------------------------------------------
QUANT_FIELDS = ["method", "w_bits", "a_bits", "patch_embed_a_bits", "head_a_bits", "calib", "softmax", "reparam",
                "output_aware", "bias_correct", "weight_rounding", "fc2_smooth", "zero_point_search", "edge_rounding",
                "per_token",
                "qk_per_head", "calib_batch_size", "percentile"]


@settings(max_examples=300, **SETTINGS)
@given(st.dictionaries(st.sampled_from(QUANT_FIELDS), ANYTHING, min_size=1, max_size=4))
def test_quant_config_accepts_only_well_typed_values(kwargs):
    try:
        cfg = fastquant.QuantConfig(**kwargs)
    except fastquant.FastquantError as exc:
        assert one_line(exc)
        return
    # Accepted: every field has its type, and the config survives its JSON form.
    for name in ("per_token", "qk_per_head"):
        assert isinstance(getattr(cfg, name), bool)
    for name in ("reparam", "output_aware", "bias_correct"):
        assert getattr(cfg, name) is None or isinstance(getattr(cfg, name), bool)
    for name in ("w_bits", "a_bits", "calib_batch_size"):
        assert isinstance(getattr(cfg, name), int) and not isinstance(getattr(cfg, name), bool)
    assert math.isfinite(cfg.percentile) and not isinstance(cfg.percentile, bool)
    assert fastquant.QuantConfig.from_json(cfg.to_json()) == cfg


RECON_FIELDS = ["iters", "batch_size", "lr_round", "lr_act", "lr_bias", "lr_norm", "round_weight", "warmup", "beta",
                "qdrop_p", "w_rec", "w_global", "w_local", "w_head", "global_rest", "global_form", "fisher_samples", "fisher_pool", "local_loss", "matmul_dtype", "seed",
                "carry", "stop_at", "level_steps", "pos", "speed"]


@settings(max_examples=200, **SETTINGS)
@given(st.sampled_from(["qdrop", "brecq", "pfcr", "mgrq", "nope", 3]),
       st.dictionaries(st.sampled_from(RECON_FIELDS), ANYTHING, max_size=3))
def test_recon_config_accepts_only_well_typed_values(method, kwargs):
    try:
        cfg = ReconConfig(method=method, **kwargs)
    except fastquant.FastquantError as exc:
        assert one_line(exc)
        return
    assert cfg.iters >= 1 and 0 <= cfg.resolved("qdrop_p") <= 1
    assert json.loads(cfg.to_json())["method"] == method


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=False), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=8)


def spec_like():
    """Dicts near a valid ModelSpec: its keys with any values, plus stray keys."""
    keys = st.sampled_from(["name", "img_size", "num_classes", "checkpoint", "extra"])
    return st.dictionaries(keys, JSON_VALUES, max_size=5)


@settings(max_examples=200, **SETTINGS)
@given(st.one_of(st.text(max_size=40), JSON_VALUES.map(json.dumps), spec_like().map(json.dumps)))
def test_from_json_refuses_malformed_text(text):
    for cls in (fastquant.QuantConfig, ModelSpec):
        try:
            obj = cls.from_json(text)
        except fastquant.FastquantError as exc:
            assert one_line(exc)
        else:
            assert cls.from_json(obj.to_json()) == obj


# -- saved files: metadata and bytes -------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(st.sampled_from(["format", "config", "model", "deploy", "sha256"]),
       st.one_of(st.text(max_size=30), JSON_VALUES.map(json.dumps), spec_like().map(json.dumps)))
def test_edited_metadata_never_loads_silently(saved, tmp_path, key, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path, _, x, logits = saved
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    if meta.get(key) == value:
        return
    meta[key] = value
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata=meta)
    before = bad.read_bytes()
    with pytest.raises(fastquant.FastquantError) as info:
        fastquant.load(bad)
    assert one_line(info.value) and bad.read_bytes() == before


@settings(max_examples=60, **SETTINGS)
@given(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4))
def test_corrupted_bytes_are_refused_or_harmless(saved, tmp_path, flips):
    """Bytes XORed anywhere in the file (header, metadata, tensor data): the load refuses it
    with one line, or gives exactly the saved model's logits."""
    path, data, x, logits = saved
    data = bytearray(data)
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    try:
        model = fastquant.load(bad)
    except fastquant.FastquantError as exc:
        assert one_line(exc)
        event("refused: " + str(exc).split(": ", 1)[-1].split(" (")[0][:40])
        return
    event("loaded")
    with torch.no_grad():
        assert torch.equal(model(x), logits)


@settings(max_examples=25, **SETTINGS)
@given(st.floats(0, 1, exclude_max=True), st.integers(1, 255))
def test_cli_eval_of_a_corrupted_file(saved, tmp_path, capsys, where, mask):
    """``fastquant eval --quantized`` on a file with a flipped byte: exit 2, one line and no
    JSON; or, where the flip is harmless, the saved model's accuracy."""
    path, data, _, _ = saved
    data = bytearray(data)
    data[int(where * len(data))] ^= mask
    bad, out = tmp_path / "bad.safetensors", tmp_path / "e.json"
    bad.write_bytes(bytes(data))
    out.write_text("an earlier result")
    code = main(["eval", "--quantized", str(bad), "--eval-size", "8", "--json", str(out)])
    _, err = capsys.readouterr()
    event(f"exit {code}")
    if code == 0:
        ref = tmp_path / "ref.json"
        assert main(["eval", "--quantized", str(path), "--eval-size", "8", "--json", str(ref)]) == 0
        capsys.readouterr()
        assert json.loads(out.read_text())["top1"] == json.loads(ref.read_text())["top1"]
    else:
        assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
        assert "Traceback" not in err and out.read_text() == "an earlier result"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "e.json"]


# -- odd tensors to the API ------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


@st.composite
def odd_tensors(draw):
    if draw(st.booleans()):  # near the right shape [N, 3, 28, 28]
        shape = [draw(st.integers(0, 3)), draw(st.sampled_from([3, 3, 1, 4, 28])),
                 draw(st.sampled_from([28, 28, 27, 3])), draw(st.sampled_from([28, 28, 3, 56]))]
    else:
        shape = draw(st.lists(st.integers(0, 4), max_size=5))
    dtype = draw(st.sampled_from(DTYPES[:1] * 3 + DTYPES))
    x = torch.rand(shape).to(dtype) if dtype != torch.bool else torch.rand(shape) > 0.5
    if x.is_floating_point() and x.numel() and draw(st.booleans()):
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return x


RTN = fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8)


@settings(max_examples=60, **SETTINGS)
@given(odd_tensors())
def test_quantize_takes_odd_tensors_cleanly(tiny, x):
    before = x.clone()
    try:
        q = fastquant.quantize(tiny[0], x, RTN, progress=False)
    except fastquant.FastquantError as exc:
        assert one_line(exc)
        event("refused")
    else:
        event("quantized")
        assert list(x.shape[1:]) == [3, 28, 28] and x.is_floating_point() and len(x) > 0
        assert torch.isfinite(x.float()).all() and isinstance(q, torch.nn.Module)
    assert torch.equal(x, before) or (x.isnan() == before.isnan()).all()


# -- bad command lines -----------------------------------------------------------------------------
BAD_VALUES = {
    "--w-bits": st.one_of(st.integers(-3, 1), st.integers(9, 64), st.text(max_size=4)),
    "--a-bits": st.one_of(st.integers(-3, 1), st.integers(9, 64), st.sampled_from(["x", "4.5", ""])),
    "--calib-size": st.one_of(st.integers(-5, 0), st.sampled_from(["many", "1e3"])),
    "--eval-size": st.one_of(st.integers(-5, 0), st.sampled_from(["all", "2.0"])),
    "--batch-size": st.one_of(st.integers(-5, 0), st.sampled_from(["big"])),
    "--threads": st.one_of(st.integers(-5, 0), st.sampled_from(["two"])),
    "--img-size": st.one_of(st.integers(-5, 7), st.sampled_from(["huge"])),
    "--method": st.text(min_size=1, max_size=6).filter(lambda s: s not in methods()),
    "--recon-set": st.text(max_size=12),
    "--model": st.text(min_size=1, max_size=10).filter(lambda s: s.strip() and not s.startswith("-")),
}


@settings(max_examples=60, **SETTINGS)
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda flag: st.tuples(st.just(flag), BAD_VALUES[flag])))
def test_cli_bad_values_are_one_line(tmp_path, capsys, flag_value):
    flag, value = flag_value
    out = tmp_path / "r.json"
    out.write_text("an earlier result")
    argv = ["quantize", "--model", "vit-tiny-fmnist", "--method", "rtn", "--calib-size", "8", "--eval-size", "8",
            "--json", str(out)]
    if flag == "--recon-set":
        argv += ["--method", "qdrop", "--iters", "1"]
    argv += [f"{flag}={value}"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exit
        code = exc.code
    _, err = capsys.readouterr()
    event(f"exit {code}")
    if code == 0:  # a value that is valid after all (e.g. a setting that exists)
        assert json.loads(out.read_text())["model"] == "vit-tiny-fmnist"
        return
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert code == 2 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert out.read_text() == "an earlier result" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
