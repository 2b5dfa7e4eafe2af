"""The other CPU runtimes a user could pick, as callables bench/run.py times beside fastquant:
fastquant's ONNX export (asymmetric weights, exact) run in ONNX Runtime and in OpenVINO, and
with symmetric weights (``weights="symmetric"``) in OpenVINO, ONNX Runtime's own int8
quantization (dynamic; static QDQ on MatMul/Gemm/Conv) and OpenVINO int8 through NNCF
(the transformer preset; and with SmoothQuant off). Each is optional: a missing package or
a failing step is returned as a reason, the others go on.

Each variant is an ``nn.Module`` that takes and returns torch tensors (so that
fastquant.evaluate and the timing loop treat it as the torch variants), running the
runtime with ``threads`` threads (ONNX Runtime: intra-op threads, one inter-op thread;
OpenVINO: INFERENCE_NUM_THREADS, f32 precision: its bf16 default is slower on these CPUs).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Runtime(nn.Module):
    """A compiled model of another runtime as a torch module (numpy in, numpy out)."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.run(x.detach().cpu().numpy().astype(np.float32))))


def _ort(path: Path, threads: int) -> Runtime:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return Runtime(lambda x: sess.run(None, {name: x})[0])


def _openvino(model, threads: int) -> Runtime:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    return Runtime(lambda x: compiled(x)[0])


def _export_fp32(model: nn.Module, img: int, path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, img, img),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


def peer_variants(model: nn.Module, qmodel: nn.Module, calib: torch.Tensor, img: int, threads: int,
                  workdir: Path) -> tuple[dict, dict]:
    """({label: Runtime}, {label: why it is missing}) for the exported fastquant model
    ``qmodel`` and the peers' own int8 quantization of the float ``model`` (calibrated on
    ``calib``, the images fastquant calibrated on)."""
    import fastquant

    workdir.mkdir(parents=True, exist_ok=True)
    variants, skipped = {}, {}

    def attempt(label, make):
        try:
            variants[label] = make()
        except Exception as exc:  # noqa: BLE001 - an optional peer; recorded, the others go on
            skipped[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"{label}: skipped ({skipped[label]})", flush=True)

    exported = workdir / "fastquant_w8a8.onnx"
    symmetric = workdir / "fastquant_w8a8_symmetric.onnx"
    fp32 = workdir / "fp32.onnx"
    attempt("fastquant W8A8 ONNX -> ORT", lambda: (fastquant.export_onnx(qmodel, exported), _ort(exported, threads))[1])
    attempt("fastquant W8A8 ONNX -> OpenVINO", lambda: _openvino(str(exported), threads))
    attempt("fastquant W8A8 ONNX symmetric -> OpenVINO",
            lambda: (fastquant.export_onnx(qmodel, symmetric, weights="symmetric"), _openvino(str(symmetric), threads))[1])
    try:
        _export_fp32(model, img, fp32)
    except Exception as exc:  # noqa: BLE001
        skipped["fp32 ONNX"] = f"{type(exc).__name__}: {exc}"
        return variants, skipped

    def ort_dynamic():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = workdir / "ort_dynamic.onnx"
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        return _ort(out, threads)

    def ort_static():
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter([{"images": calib[i:i + 16].numpy()} for i in range(0, len(calib), 16)])

            def get_next(self):
                return next(self.batches, None)

        out = workdir / "ort_static.onnx"
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"])
        return _ort(out, threads)

    def nncf_int8(smooth: bool):
        import nncf
        import openvino as ov

        ov_model = ov.convert_model(str(fp32))
        data = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
        kw = {} if smooth else {"advanced_parameters": nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))}
        q = nncf.quantize(ov_model, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib), **kw)
        return _openvino(q, threads)

    attempt("ORT int8 dynamic", ort_dynamic)
    attempt("ORT int8 static QDQ", ort_static)
    attempt("OpenVINO int8 (NNCF)", lambda: nncf_int8(True))
    attempt("OpenVINO int8 (NNCF, SmoothQuant off)", lambda: nncf_int8(False))
    return variants, skipped
