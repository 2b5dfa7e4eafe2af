"""User mistakes end in one line, finished work is never lost, corrupted files never load
silently. One test (or group) per failure a new user met; vit-tiny-fmnist throughout."""
import copy
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastquant
from fastquant import recon
from fastquant.cli import main
from fastquant.files import atomic_write, atomic_write_text

TINY = ["--model", "vit-tiny-fmnist", "--data", "fmnist", "--calib-size", "16", "--eval-size", "20"]
RTN8 = ["--method", "rtn", "--w-bits", "8", "--a-bits", "8"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line of a failed command: stderr's last line (progress bars and warnings
    before it are fine); fails on a traceback or a second error."""
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def saved(tiny, tiny_data, tmp_path_factory):
    """(quantized W4A6 model, its file, test images)."""
    model, _, _ = tiny
    calib, test = tiny_data
    q = fastquant.quantize(model, calib[:32], fastquant.QuantConfig(w_bits=4, a_bits=6, method="repq"),
                           progress=False)
    path = tmp_path_factory.mktemp("saved") / "q.safetensors"
    fastquant.save(q, path)
    x, _ = test.batch(range(8))
    return q, path, x


# -- safetensors surgery: the header, a tensor's bytes, the metadata -----------------------------
def header(path: Path) -> tuple[dict, int]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), 8 + n


def tensor_bytes(path: Path, name: str) -> tuple[int, int]:
    """The absolute byte range of tensor ``name`` in a safetensors file."""
    head, base = header(path)
    start, end = head[name]["data_offsets"]
    return base + start, base + end


def rewrite(src: Path, dst: Path, *, meta=None, tensors=None):
    """Copy a safetensors file with some metadata keys replaced (None: removed) and some
    tensors replaced, leaving the checksums as they were (what an edit by hand does)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
    for k, v in (meta or {}).items():
        if v is None:
            md.pop(k, None)
        else:
            md[k] = v
    sd = load_file(str(src))
    sd.update(tensors or {})
    save_file(sd, str(dst), metadata=md)
    return dst


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder that exists and cannot take a new file, for root too (where chmod is no bar)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / ".fastquant-probe").open("w").close()
        except OSError:
            return candidate
    pytest.skip("no folder here refuses new files to this user")


# -- 1. output paths that cannot be written are refused before any work ---------------------------
@pytest.mark.parametrize("flag", ["--out", "--json", "--plot", "--state-dir"])
def test_unwritable_output_folder_is_refused_up_front(capsys, tmp_path, flag, monkeypatch):
    import fastquant.api

    def no_work(*a, **k):
        raise AssertionError("quantize ran although an output cannot be written")

    monkeypatch.setattr(fastquant.api, "quantize", no_work)
    folder = unwritable_folder(tmp_path)
    name = {"--out": "m.safetensors", "--json": "r.json", "--plot": "p.png", "--state-dir": "state"}[flag]
    method = ["--method", "qdrop", "--iters", "2"] if flag in ("--plot", "--state-dir") else RTN8
    code, _, err = run(capsys, "quantize", *TINY, *method, flag, str(folder / name),
                       "--json" if flag != "--json" else "--out", str(tmp_path / "other"))
    assert code == 2
    line = error_line(err)
    assert flag in line and "cannot write" in line
    assert not (tmp_path / "other").exists()


def test_a_failing_plot_or_json_never_loses_the_model(capsys, tmp_path, monkeypatch):
    """The model is written first; a plot that cannot be written is a warning, a JSON that
    cannot be written is one error line (exit 1) that says where the model is."""
    import fastquant.cli as cli
    import fastquant.recon as plot

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plot, "plot_losses", broken)
    monkeypatch.setattr(cli, "_write_json", broken)
    out = tmp_path / "m.safetensors"
    with pytest.warns(UserWarning, match="the loss plot .* was not written .*No space left"):
        code, _, err = run(capsys, "quantize", *TINY, "--method", "qdrop", "--w-bits", "4", "--a-bits", "4",
                           "--iters", "2", "--plot", str(tmp_path / "p.png"), "--out", str(out),
                           "--json", str(tmp_path / "r.json"))
    assert code == 1
    line = error_line(err)
    assert "JSON result" in line and str(out) in line
    assert isinstance(fastquant.load(out), nn.Module)
    assert files_in(tmp_path) == ["m.safetensors"]


# -- 2. edited metadata: one line from the CLI and from the API ------------------------------------
@pytest.mark.parametrize("edit, match", [
    ({"model": None}, "corrupted metadata"),
    ({"model": "{not json"}, "corrupted metadata"),
    ({"model": '{"name": "vit-tiny-fmnist", "img_size": 28, "num_classes": 10, "checkpoint": null, "x": 1}'},
     "corrupted metadata"),
    ({"config": '{"w_bits": "four"}'}, "corrupted metadata"),
    ({"config": "[1, 2]"}, "corrupted metadata"),
    ({"sha256": "{oops"}, "checksums are not a JSON mapping"),
])
def test_edited_metadata_is_one_line(capsys, saved, tmp_path, edit, match):
    bad = rewrite(saved[1], tmp_path / "bad.safetensors", meta=edit)
    code, _, err = run(capsys, "eval", "--quantized", str(bad), "--json", str(tmp_path / "e.json"))
    assert code == 2 and match in error_line(err)
    assert not (tmp_path / "e.json").exists()
    with pytest.raises(fastquant.FastquantError, match=match):
        fastquant.load(bad)


def test_metadata_edit_that_stays_valid_is_caught_by_the_checksum(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(str(saved[1]), framework="pt") as f:
        cfg = json.loads(f.metadata()["config"])
    cfg["a_bits"] = 8
    bad = rewrite(saved[1], tmp_path / "bad.safetensors", meta={"config": json.dumps(cfg)})
    with pytest.raises(fastquant.FastquantError, match="metadata: it does not match its checksum"):
        fastquant.load(bad)


# -- 3. concurrent saves, interrupted saves ------------------------------------------------------
def test_concurrent_saves_to_one_path_all_succeed(saved, tmp_path):
    q, _, x = saved
    out, errors = tmp_path / "m.safetensors", []

    def saver():
        try:
            for _ in range(15):
                fastquant.save(q, out)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=saver) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert files_in(tmp_path) == ["m.safetensors"]
    with torch.no_grad():
        assert torch.equal(fastquant.load(out)(x), q(x))


def test_concurrent_json_writes_all_succeed(tmp_path):
    out, errors = tmp_path / "r.json", []

    def writer(i):
        try:
            for j in range(50):
                atomic_write_text(out, json.dumps({"writer": i, "n": j}))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and json.loads(out.read_text())["n"] == 49
    assert files_in(tmp_path) == ["r.json"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError, SystemExit])
def test_an_interrupted_save_leaves_the_old_file_and_no_temporary(saved, tmp_path, monkeypatch, exc):
    import safetensors.torch

    q, path, _ = saved
    out = tmp_path / "m.safetensors"
    out.write_bytes(path.read_bytes())
    before = out.read_bytes()

    def half_written(sd, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise exc()

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(exc):
        fastquant.save(q, out)
    assert files_in(tmp_path) == ["m.safetensors"] and out.read_bytes() == before


def test_sigterm_ends_the_cli_cleanly(tmp_path):
    """SIGTERM during a run: exit 143, one line, no output file and no temporary left."""
    proc = subprocess.Popen([sys.executable, "-m", "fastquant.cli", "quantize", *TINY[:-1], "10000", *RTN8,
                             "--out", str(tmp_path / "m.safetensors"), "--json", str(tmp_path / "r.json")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = ""
    while "eval fp32" not in seen:  # the progress bar: main() runs, its handler is installed
        ch = proc.stderr.read(1)
        assert ch, f"the run ended before evaluating: {seen}"
        seen += ch
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "terminated" in rest and "Traceback" not in rest
    assert files_in(tmp_path) == []


def test_atomic_write_gives_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"y"))
    finally:
        os.umask(old)
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_saved_model_mode_follows_the_umask(saved, tmp_path):
    old = os.umask(0o022)
    try:
        fastquant.save(saved[0], tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644


# -- 4. --checkpoint with a built-in model ---------------------------------------------------------
@pytest.mark.parametrize("ckpt", ["/no/such/file.pth", "EXISTING"])
def test_checkpoint_with_a_builtin_model_is_refused(capsys, tmp_path, ckpt):
    if ckpt == "EXISTING":
        ckpt = str(tmp_path / "w.pth")
        torch.save({}, ckpt)
    code, _, err = run(capsys, "quantize", *TINY, *RTN8, "--checkpoint", ckpt, "--json", str(tmp_path / "r.json"))
    assert code == 2 and "brings its own weights" in error_line(err)
    code, _, err = run(capsys, "eval", "--model", "vit-tiny-fmnist", "--checkpoint", ckpt, "--eval-size", "4")
    assert code == 2 and "brings its own weights" in error_line(err)
    assert not (tmp_path / "r.json").exists()


def test_checkpoint_with_quantized_is_refused(capsys, saved):
    code, _, err = run(capsys, "eval", "--quantized", str(saved[1]), "--checkpoint", "/x.pth")
    assert code == 2 and "--checkpoint" in error_line(err)


# -- 5. integrity of saved models ----------------------------------------------------------------
def scale_name(path: Path) -> str:
    head, _ = header(path)
    return next(k for k in sorted(head) if k.endswith("qkv.weight_quant.scale"))


def test_a_flipped_byte_in_a_tensor_is_named(saved, tmp_path):
    _, path, _ = saved
    name = scale_name(path)
    start, end = tensor_bytes(path, name)
    data = bytearray(path.read_bytes())
    data[start + 1] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(fastquant.FastquantError, match=f"tensor {name} does not match its checksum"):
        fastquant.load(bad)


def test_a_nan_scale_is_refused(saved, tmp_path):
    _, path, _ = saved
    name = scale_name(path)
    start, end = tensor_bytes(path, name)
    data = bytearray(path.read_bytes())
    data[start:start + 4] = struct.pack("<f", float("nan"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(fastquant.FastquantError, match="does not match its checksum"):
        fastquant.load(bad)
    # Without checksums (a file from before they existed), the value checks still refuse it.
    from safetensors.torch import load_file

    sd = load_file(str(bad))
    old = rewrite(bad, tmp_path / "old.safetensors", meta={"sha256": None})
    assert torch.isnan(sd[name]).any()
    with pytest.raises(fastquant.FastquantError, match=f"tensor {name} holds NaN or Inf"):
        fastquant.load(old)


def test_value_checks_without_checksums(saved, tmp_path):
    from safetensors.torch import load_file

    _, path, _ = saved
    sd = load_file(str(path))
    name = scale_name(path)
    zp_name = name.replace(".scale", ".zero_point")
    for tensors, match in (({name: -sd[name]}, "is not positive"),
                           ({zp_name: sd[zp_name] + 100}, "outside 0..15")):
        bad = rewrite(path, tmp_path / "bad.safetensors", meta={"sha256": None}, tensors=tensors)
        with pytest.raises(fastquant.FastquantError, match=match):
            fastquant.load(bad)
    # A file without checksums and with plausible values still loads (older files).
    assert isinstance(fastquant.load(rewrite(path, tmp_path / "ok.safetensors", meta={"sha256": None})), nn.Module)


def test_swapped_tensors_are_refused(saved, tmp_path):
    from safetensors.torch import load_file

    _, path, _ = saved
    sd = load_file(str(path))
    a, b = [k for k in sorted(sd) if k.endswith("fc1.bias")][:2]
    assert sd[a].shape == sd[b].shape and not torch.equal(sd[a], sd[b])
    bad = rewrite(path, tmp_path / "bad.safetensors", tensors={a: sd[b], b: sd[a]})
    with pytest.raises(fastquant.FastquantError, match="does not match its checksum \\(1 more\\)"):
        fastquant.load(bad)


def test_load_is_unchanged_for_an_intact_file(saved):
    q, path, x = saved
    with torch.no_grad():
        assert torch.equal(fastquant.load(path)(x), q(x))


# -- 5 and 6. integrity of the reconstruction state ----------------------------------------------
@pytest.fixture(scope="module")
def one_unit(tiny, tiny_data, tmp_path_factory):
    """(float model, calibrated W4A4 model, images, config, a state dir after one unit)."""
    model, _, _ = tiny
    calib = tiny_data[0][:16]
    q = fastquant.quantize(model, calib, fastquant.QuantConfig(w_bits=4, a_bits=4, method="rtn", reparam=True),
                           progress=False)
    cfg = recon.ReconConfig(iters=2, batch_size=8, capture_batch_size=16)
    state = tmp_path_factory.mktemp("state") / "s"
    recon.run_method(model, copy.deepcopy(q), calib, "qdrop", cfg, state_dir=state, progress=False, max_units=1)
    return model, q, calib, cfg, state


def resume(one_unit, state_dir):
    model, q, calib, cfg, _ = one_unit
    return recon.run_method(model, copy.deepcopy(q), calib, "qdrop", cfg, state_dir=state_dir, resume=True,
                            progress=False)


def edited_state(one_unit, tmp_path, edit, *, fix_checksum: bool) -> Path:
    from fastquant.recon.checkpoint import STATE_FILE, state_checksum

    folder = tmp_path / "edited"
    folder.mkdir()
    payload = torch.load(one_unit[4] / STATE_FILE, weights_only=True)
    edit(payload)
    if fix_checksum and all(isinstance(v, torch.Tensor) for v in payload.get("state_dict", {}).values()):
        payload["checksum"] = state_checksum(payload.get("state_dict", {}), payload.get("done"),
                                             payload.get("record"))
    torch.save(payload, folder / STATE_FILE)
    return folder


def test_state_resumes_when_intact(one_unit, tmp_path):
    import shutil

    shutil.copytree(one_unit[4], tmp_path / "s")
    assert resume(one_unit, tmp_path / "s").resumed_from == 1


def test_a_changed_tensor_in_the_state_is_refused(one_unit, tmp_path):
    def flip(payload):
        sd = payload["state_dict"]
        name = next(k for k in sorted(sd) if k.endswith(".alpha"))
        sd[name].view(-1)[0] += 1.0

    with pytest.raises(fastquant.FastquantError, match="does not match its checksum"):
        resume(one_unit, edited_state(one_unit, tmp_path, flip, fix_checksum=False))


def test_flipped_bytes_in_the_state_file_are_refused(one_unit, tmp_path):
    """Raw bytes flipped inside a tensor's storage in the zip file."""
    from fastquant.recon.checkpoint import STATE_FILE

    src = one_unit[4] / STATE_FILE
    payload = torch.load(src, weights_only=True)
    name = max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    needle = payload["state_dict"][name].contiguous().view(-1)[:16].numpy().tobytes()
    data = bytearray(src.read_bytes())
    at = data.find(needle)
    assert at > 0
    data[at + 5] ^= 0x40
    folder = tmp_path / "flipped"
    folder.mkdir()
    (folder / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(fastquant.FastquantError, match="corrupted|not a fastquant|cannot be read"):
        resume(one_unit, folder)


@pytest.mark.parametrize("edit, match", [
    (lambda p: p.pop("done"), "units done"),
    (lambda p: p.update(done=-1), "-1 units done"),
    (lambda p: p.update(done=99), "99 units done"),
    (lambda p: p.update(done=True), "units done"),
    (lambda p: p.update(done=2), "does not list the 2 units done"),
    (lambda p: p["record"].update(units=[{"name": "block0"}]), "unit's record is malformed"),
    (lambda p: p.update(record="x"), "does not list"),
    (lambda p: p.update(state_dict={"a": 1}), "no model state"),
    (lambda p: p["state_dict"].update(bogus=torch.zeros(1)), "does not fit this model"),
    (lambda p: p["state_dict"][next(iter(sorted(p["state_dict"])))].fill_(float("nan")), "holds NaN or Inf"),
])
def test_malformed_state_fields_are_refused(one_unit, tmp_path, edit, match):
    """Fields a resume reads, malformed with a valid fingerprint and checksum (a writer's bug,
    not a flipped bit): refused before anything is trained."""
    with pytest.raises(fastquant.FastquantError, match=match):
        resume(one_unit, edited_state(one_unit, tmp_path, edit, fix_checksum=True))


# -- 7. config types -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"per_token": "no"}, "per_token must be True or False"),
    ({"qk_per_head": None}, "qk_per_head must be True or False"),
    ({"reparam": "yes"}, "reparam must be True, False or None"),
    ({"output_aware": 2}, "output_aware must be True, False or None"),
    ({"bias_correct": 1.0}, "bias_correct must be True, False or None"),
    ({"percentile": "x"}, "percentile must be a number"),
    ({"percentile": float("nan")}, "percentile must be a number"),
    ({"percentile": True}, "percentile must be a number"),
    ({"calib_batch_size": True}, "calib_batch_size must be a positive integer"),
    ({"calib_batch_size": 2.0}, "calib_batch_size must be a positive integer"),
    ({"w_bits": 4.0}, "w_bits"),
    ({"w_bits": True}, "w_bits"),
    ({"method": 3}, "unknown method"),
    ({"calib": 5}, "calib must be a name"),
])
def test_quant_config_types_are_strict(kwargs, match):
    with pytest.raises(fastquant.FastquantError, match=match):
        fastquant.QuantConfig(**kwargs)


@pytest.mark.parametrize("text", ["[]", "3", "null", "{", '{"per_token": "no"}', '{"speed": 1}'])
def test_quant_config_from_json_is_strict(text):
    with pytest.raises(fastquant.FastquantError):
        fastquant.QuantConfig.from_json(text)


# -- 8. calibration images and models passed to the API ------------------------------------------
@pytest.fixture(scope="module")
def images(tiny_data):
    return tiny_data[0][:8]


RTN = fastquant.QuantConfig(method="rtn", w_bits=8, a_bits=8)


@pytest.mark.parametrize("make, match", [
    (lambda x: x[:, :1], "must have 3 channels for this model, got 1"),
    (lambda x: x[0], "non-empty \\[N, C, H, W\\] tensor"),
    (lambda x: x[:, :, :20, :20], "must be 28x28 for this model, got 20x20"),
    (lambda x: x.permute(0, 2, 3, 1), "channels-last"),
    (lambda x: torch.tensor(1.0), "0-d tensor"),
    (lambda x: (x * 50).to(torch.uint8), "floating point"),
    (lambda x: x.numpy(), "tensor"),
])
def test_bad_calibration_images_are_named(tiny, images, make, match):
    with pytest.raises(fastquant.FastquantError, match=match):
        fastquant.quantize(tiny[0], make(images), RTN, progress=False)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_types_are_converted(tiny, images, dtype):
    q = fastquant.quantize(tiny[0], images.to(dtype), RTN, progress=False)
    ref = fastquant.quantize(tiny[0], images.to(dtype).float(), RTN, progress=False)
    with torch.no_grad():
        assert torch.equal(q(images), ref(images))


@pytest.mark.parametrize("model", ["vit-tiny-fmnist", None, 3])
def test_model_must_be_a_module(images, model):
    with pytest.raises(fastquant.FastquantError, match="model must be a torch.nn.Module"):
        fastquant.quantize(model, images, RTN, progress=False)


def test_save_to_a_folder_is_refused(saved, tmp_path):
    with pytest.raises(fastquant.FastquantError, match="is a folder"):
        fastquant.save(saved[0], tmp_path)
    assert files_in(tmp_path) == []


# -- 9. silent surprises -------------------------------------------------------------------------
def make_folder(root: Path, classes=("cat", "dog"), n=2, size=32):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray((torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()).save(root / c / f"{i}.png")
    return root


def test_class_count_and_eval_size_surprises_are_warned(capsys, tmp_path):
    folder = make_folder(tmp_path / "data")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, _, err = run(capsys, "eval", "--model", "vit-tiny-fmnist", "--data", f"imagefolder:{folder}",
                           "--eval-size", "100")
    assert code == 0, err
    said = [str(w.message) for w in seen]
    assert any("the data has 2 classes and the model's head 10" in m for m in said), said
    assert any("--eval-size 100: the test set has 4 images" in m for m in said), said


def test_a_model_without_attention_is_warned(images):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 26 * 26, 10))
    with pytest.warns(UserWarning, match="has no timm attention module"):
        fastquant.quantize(model, images, RTN, progress=False)


def test_a_vit_gives_no_warning(tiny, images):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastquant.quantize(tiny[0], images, RTN, progress=False)


def test_convert_twice_says_why(saved):
    deployed = fastquant.convert(saved[0], "torch")
    with pytest.raises(fastquant.FastquantError, match="already deployed"):
        fastquant.convert(deployed, "torch")


def test_a_folder_as_checkpoint_or_quantized_says_folder(capsys, tmp_path):
    code, _, err = run(capsys, "eval", "--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path))
    assert code == 2 and "is a folder" in error_line(err)
    code, _, err = run(capsys, "eval", "--quantized", str(tmp_path))
    assert code == 2 and "is a folder" in error_line(err)
