import json
import os
import subprocess
import sys

import pytest
import torch

from fastquant.cli import main

TINY = ["--model", "vit-tiny-fmnist", "--data", "fmnist", "--calib-size", "32", "--eval-size", "100"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_writes_json_and_model(capsys, tmp_path):
    out_json, out_model = tmp_path / "r.json", tmp_path / "m.safetensors"
    code, out, err = run(capsys, "quantize", *TINY, "--method", "rtn", "--w-bits", "8", "--a-bits", "8",
                         "--json", str(out_json), "--out", str(out_model))
    assert code == 0, err
    r = json.loads(out_json.read_text())
    for key in ("model", "method", "w_bits", "a_bits", "fp_top1", "q_top1", "calib_size", "eval_size", "seconds"):
        assert key in r
    assert r["model"] == "vit-tiny-fmnist" and r["calib_size"] == 32 and r["eval_size"] == 100
    assert abs(r["fp_top1"] - r["q_top1"]) <= 3
    assert "quantized top-1" in out
    # `fastquant eval --quantized` reproduces the quantized accuracy.
    code, out, err = run(capsys, "eval", "--quantized", str(out_model), "--eval-size", "100", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == r["q_top1"]


def test_quantize_deploy_cpu_reports_and_saves_the_integer_model(capsys, tmp_path):
    out_json, out_model = tmp_path / "r.json", tmp_path / "d.safetensors"
    code, out, err = run(capsys, "quantize", *TINY, "--method", "rtn", "--w-bits", "8", "--a-bits", "8",
                         "--deploy", "cpu", "--json", str(out_json), "--out", str(out_model))
    assert code == 0, err
    r = json.loads(out_json.read_text())
    assert r["deploy"] == "cpu" and r["deployed_layers"] > 0
    assert abs(r["deployed_top1"] - r["q_top1"]) <= 2
    assert "deployed top-1" in out
    code, out, err = run(capsys, "eval", "--quantized", str(out_model), "--eval-size", "100",
                         "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["top1"] == r["deployed_top1"]


def make_folder(root, n=3, size=40):
    from PIL import Image

    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            arr = (torch.rand(size, size, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


def test_imagefolder_and_timm_checkpoint(capsys, tmp_path):
    """The path users with their own data and timm checkpoint take."""
    from safetensors.torch import save_file

    from fastquant._compat import import_timm

    folder = make_folder(tmp_path / "imgs")
    timm = import_timm()
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=2)
    ckpt = tmp_path / "ckpt.safetensors"
    save_file(m.state_dict(), str(ckpt))
    code, out, err = run(capsys, "quantize", "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt),
                         "--img-size", "32", "--data", f"imagefolder:{folder}", "--method", "repq",
                         "--w-bits", "4", "--a-bits", "8", "--calib-size", "4", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["eval_size"] == 6 and r["calib_size"] == 4


def bad_ckpt(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(p))
    return p


@pytest.mark.parametrize("args,match", [
    (["--model", "no-such-model"], "unknown model"),
    (["--method", "magic"], "unknown method"),
    (["--data", "mnist"], "unknown dataset"),
    (["--w-bits", "9"], "w_bits must be an integer from 2 to 8"),
    (["--a-bits", "1"], "a_bits must be an integer from 2 to 8"),
    (["--w-bits", "four"], "expected an integer"),
    (["--data", "imagefolder:/no/such/folder"], "does not exist"),
    (["--model", "vit_tiny_patch16_224", "--checkpoint", "/no/such.pth"], "does not exist"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--checkpoint", "BAD"], "does not fit"),
    (["--calib-size", "0"], "calibration set is empty"),
    (["--calib-size", "100000"], "larger than the training split"),
    (["--out", "/no/such/dir/m.safetensors"], "does not exist"),
    (["--bogus-flag"], "unrecognized arguments"),
    (["--method", "repq", "--budget", "cpu"], "only for the reconstruction methods"),
    (["--method", "qdrop", "--no-pos"], "--no-pos applies to pfcr only"),
    (["--method", "qdrop", "--resume"], "--resume needs --state-dir"),
    (["--method", "qdrop", "--iters", "0"], "positive"),
    (["--method", "pfcr", "--recon-set", "carry"], "expected KEY=VALUE"),
    (["--method", "pfcr", "--recon-set", "speed=11"], "--recon-set speed: not a reconstruction setting"),
    (["--method", "pfcr", "--recon-set", "carry=2"], "carry must be in [0, 1]"),
    (["--method", "pfcr", "--recon-set", "w_rec=0"], "all zero"),
    (["--method", "pfcr", "--recon-set", "method=brecq"], "choose the method with --method"),
    (["--method", "repq", "--recon-set", "carry=1"], "only for the reconstruction methods"),
    *([(["--deploy", "triton"], "needs a CUDA GPU"), (["--deploy", "cuda"], "needs a CUDA GPU")]
      if not torch.cuda.is_available() else []),
    (["--deploy", "fpga"], "invalid choice"),
])
def test_bad_input_one_line_exit_2(capsys, tmp_path, args, match):
    args = [str(bad_ckpt(tmp_path)) if a == "BAD" else a for a in args]
    base = ["--model", "vit-tiny-fmnist", "--eval-size", "10", "--calib-size", "8"]
    out_json = tmp_path / "r.json"
    code, out, err = run(capsys, "quantize", *base, *args, "--json", str(out_json))
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    assert not out_json.exists()


def test_missing_dataset_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTQUANT_FMNIST", str(tmp_path / "none"))
    code, _, err = run(capsys, "quantize", *TINY)
    assert code == 2 and "Fashion-MNIST folder" in err and len(err.strip().splitlines()) == 1


def test_corrupted_quantized_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    code, _, err = run(capsys, "eval", "--quantized", str(bad), "--json", str(tmp_path / "e.json"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_console_script_no_traceback(tmp_path):
    """The installed entry point: exit code 2 and no traceback for a user mistake."""
    proc = subprocess.run([sys.executable, "-m", "fastquant.cli", "quantize", "--model", "nope"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: unknown model")


def test_reconstruction_method_records_budget_and_resumes(capsys, tmp_path):
    """A reconstruction run through the CLI records its budget; the state dir is not
    overwritten without --resume, and --resume finishes with the same accuracy."""
    state = tmp_path / "state"
    args = ["quantize", *TINY, "--method", "qdrop", "--w-bits", "4", "--a-bits", "4", "--budget", "cpu",
            "--iters", "2", "--calib-size", "16", "--state-dir", str(state)]
    code, out, err = run(capsys, *args, "--json", str(tmp_path / "a.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "a.json").read_text())
    assert r["method"] == "qdrop" and r["budget"] == "cpu" and r["iters_per_unit"] == 2 and r["calib_size"] == 16
    assert len(r["recon_units"]) == 4  # one unit per block of vit-tiny
    code, _, err = run(capsys, *args, "--json", str(tmp_path / "b.json"))
    assert code == 2 and "already holds a reconstruction state" in err and not (tmp_path / "b.json").exists()
    code, _, err = run(capsys, *args, "--resume", "--json", str(tmp_path / "c.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["q_top1"] == r["q_top1"]


def test_recon_set_changes_the_reconstruction(capsys, tmp_path):
    """--recon-set stop_at=0 leaves PFCR at its first level (an attention and an MLP unit
    per block) and the JSON records the setting."""
    code, _, err = run(capsys, "quantize", *TINY, "--method", "pfcr", "--w-bits", "4", "--a-bits", "4",
                       "--iters", "2", "--calib-size", "16", "--recon-set", "stop_at=0", "--recon-set", "carry=1.0",
                       "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["recon_config"]["stop_at"] == 0 and r["recon_config"]["carry"] == 1.0
    assert len(r["recon_units"]) == 8 and {u["level"] for u in r["recon_units"]} == {0}
    # the machine it ran on: the CPU's name and the extensions that decide its speed
    assert isinstance(r["cpu"], str) and r["cpu"] and r["threads"] >= 1
