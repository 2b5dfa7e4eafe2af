import pytest
import torch

import fastquant


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
    assert fastquant.record_of(loaded).config == fastquant.record_of(q).config


def test_file_holds_integer_weights(saved):
    from safetensors.torch import load_file

    _, path, _ = saved
    sd = load_file(str(path))
    packed = {k: v for k, v in sd.items() if k.endswith(".weight_int4")}  # the 4-bit layers: two codes per byte
    assert packed and all(v.dtype == torch.uint8 for v in packed.values())
    qkv = next(k for k in packed if k.endswith("qkv.weight_int4"))
    assert packed[qkv].shape[1] * 2 == int(sd[qkv.replace("weight_int4", "weight_cols")])
    ints = {k: v for k, v in sd.items() if k.endswith(".weight_int")}  # the 8-bit patch embedding
    assert all(v.dtype == torch.uint8 for v in ints.values())
    assert not any(k.endswith("qkv.weight") for k in sd)


@pytest.mark.parametrize("cols", [1, 6, 7])
def test_int4_packing_roundtrip(cols):
    from fastquant.ops.int8_linear import pack_int4, unpack_int4

    codes = torch.randint(0, 16, (5, cols), dtype=torch.uint8)
    packed = pack_int4(codes, dim=-1)
    assert packed.shape == (5, (cols + 1) // 2)
    assert torch.equal(unpack_int4(packed, cols, dim=-1), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) + (16 * int(codes[0, 1]) if cols > 1 else 0)


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
