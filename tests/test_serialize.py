import pytest
import torch

import fastquant
from fastquant.modules import QuantLinear


@pytest.fixture(scope="module")
def saved(tiny, tiny_data, tmp_path_factory):
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=6, method="repq"), progress=False)
    path = tmp_path_factory.mktemp("save") / "q.safetensors"
    fastquant.save(q, path)
    return q, path, test


def test_load_gives_equal_logits(saved):
    q, path, test = saved
    loaded = fastquant.load(path)
    x, _ = test.batch(range(16))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    assert loaded.fastquant_config == q.fastquant_config


def test_file_holds_integer_weights(saved):
    from safetensors.torch import load_file

    _, path, _ = saved
    sd = load_file(str(path))
    ints = {k: v for k, v in sd.items() if k.endswith(".weight_int")}
    assert ints and all(v.dtype == torch.uint8 and int(v.max()) <= 15 for v in ints.values())
    assert not any(k.endswith("qkv.weight") for k in sd)


def test_corrupted_file(tmp_path, saved):
    _, path, _ = saved
    bad = tmp_path / "bad.safetensors"
    data = path.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(fastquant.FastquantError):
        fastquant.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(fastquant.FastquantError, match="not a readable safetensors"):
        fastquant.load(junk)
    with pytest.raises(fastquant.FastquantError, match="does not exist"):
        fastquant.load(tmp_path / "missing.safetensors")


def test_plain_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(fastquant.FastquantError, match="not a fastquant quantized model"):
        fastquant.load(p)


def test_save_needs_a_quantized_model(tiny, tmp_path):
    model, _, _ = tiny
    with pytest.raises(fastquant.FastquantError, match="fastquant.quantize"):
        fastquant.save(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
