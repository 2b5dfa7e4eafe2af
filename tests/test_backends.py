"""Every backend module imports, every registered kernel resolves, every op is declared once
with a fake that agrees with it: checked on the CPU, so that a moved or renamed file cannot
break a GPU path unseen (the GPU paths themselves run only on a GPU: bench/gpu_check.sh).
"""
import ast
import inspect
import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import fastquant
from fastquant import backends, ops
from fastquant.ops.op import BACKENDS, REGISTRY

REPO = Path(__file__).resolve().parents[1]
EXPECTED_OPS = {"quantize_per_token_int8", "quantize_asym", "int8_gemm", "pack_weight_int4", "int8_linear",
                "quant_attention", "fake_quant_uniform", "fake_quant_log", "fq_linear_fwd", "fq_linear_bwd",
                "fq_attention_fwd", "fq_attention_bwd"}
# Which backends implement which ops (a backend missing here must say why).
IMPLEMENTS = {
    "cpu": {"int8_linear", "fake_quant_uniform", "fake_quant_log", "quant_attention"},
    "triton": {"quantize_per_token_int8", "quantize_asym", "int8_gemm", "int8_linear", "quant_attention",
               "fq_linear_fwd", "fq_linear_bwd", "fq_attention_fwd", "fq_attention_bwd"},
    "cuda": {"quantize_per_token_int8", "quantize_asym", "int8_gemm", "pack_weight_int4", "int8_linear",
             "quant_attention"},
}


def test_every_backend_module_imports():
    for info in pkgutil.iter_modules(backends.__path__):
        importlib.import_module(f"fastquant.backends.{info.name}")
    assert set(REGISTRY) == EXPECTED_OPS


def test_every_op_is_a_library_op_with_its_twin():
    for name, op in REGISTRY.items():
        assert op.backends()[0] == "torch" and op.implementation("torch") is op.twin, name
        assert getattr(torch.ops.fastquant, name) is not None
        assert op.library is not None, name


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_each_backend_is_registered_or_says_why(backend):
    available = backends.AVAILABLE[backend]
    for name in IMPLEMENTS[backend]:
        op = REGISTRY[name]
        if available:
            assert op.available(backend), (name, backend)
        else:
            assert not op.available(backend) and op.why_not(backend) == backends.REASONS[backend], (name, backend)
            with pytest.raises(fastquant.FastquantError, match=f"backend '{backend}' is unavailable"):
                op.implementation(backend)
    for name in EXPECTED_OPS - IMPLEMENTS[backend]:
        assert not REGISTRY[name].available(backend), (name, backend)


def test_registered_triton_kernels_resolve():
    """Each Triton kernel is imported on first use: resolve every one now (a kernel module or
    launcher renamed under kernels/ fails here, not on a GPU)."""
    pytest.importorskip("triton")
    from fastquant.backends import triton_kernels

    lazy = [obj for obj in vars(triton_kernels).values() if inspect.isfunction(obj) and hasattr(obj, "resolve")]
    for name, op in REGISTRY.items():
        if op.available("triton"):
            fn = op.implementation("triton")
            if hasattr(fn, "resolve"):
                lazy.append(fn)
            else:  # composed in the backend module from its lazy kernels
                assert fn.__module__ == triton_kernels.__name__, (name, fn)
    assert len(lazy) >= 10
    for obj in lazy:
        target = obj.resolve()
        assert callable(target) and target.__module__.startswith("fastquant.kernels."), obj


def test_torch_backward_of_fq_attention_is_autograds():
    """The fq_attention ops' torch backward (the formulas written out) equals autograd through
    the twin, to float32 rounding."""
    args = _opcheck_args()["fq_attention_fwd"]
    q, k, v = (t.clone().requires_grad_() for t in args[:3])
    s_q, s_k, s_v = (args[i].clone().requires_grad_() for i in (3, 5, 7))
    rest = dict(z_q=args[4], z_k=args[6], z_v=args[8], p_scale=args[9], qmax=15, sm_scale=0.25, p_steps=2, p_bits=4)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    leaves = [q, k, v, s_q, s_k, s_v]
    ref = torch.autograd.grad((ops.fq_attention.torch_fq_attention(q, k, v, s_q=s_q, s_k=s_k, s_v=s_v, **rest) * g).sum(),
                              leaves)
    got = torch.autograd.grad((ops.fq_attention.fq_attention(q, k, v, s_q=s_q, s_k=s_k, s_v=s_v, **rest,
                                                             backend="torch") * g).sum(), leaves)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def _bound_names(cpp: Path) -> set:
    return set(re.findall(r'm\.def\("(\w+)"', cpp.read_text()))


def _attributes_used(module: Path, ext: str) -> set:
    tree = ast.parse(module.read_text())
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == ext}


@pytest.mark.parametrize("module, ext, bindings", [("cuda_ext.py", "_C", "bindings.cpp"),
                                                   ("cpu_ext.py", "_C_cpu", "cpu_int8.cpp")])
def test_extension_functions_the_backends_call_are_bound(module, ext, bindings):
    """Every ``_C.<name>`` / ``_C_cpu.<name>`` a backend module calls is defined in the pybind11
    bindings (the CUDA extension cannot be built here; this catches a rename)."""
    used = _attributes_used(REPO / "fastquant" / "backends" / module, ext)
    bound = _bound_names(REPO / "csrc" / bindings)
    assert used and used <= bound, used - bound


def test_describe_lists_the_registered_backends():
    d = backends.describe()
    assert d["ops"]["int8_linear"][0] == "torch" and set(d["ops"]) == EXPECTED_OPS


def test_an_unknown_backend_is_named():
    with pytest.raises(fastquant.FastquantError, match="unknown backend 'fpga'"):
        REGISTRY["int8_gemm"].implementation("fpga")
    assert BACKENDS == ("torch", "cpu", "triton", "cuda")


def _opcheck_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    a, rowsum, s_x, c_x = ops.int8_linear.torch_quantize_asym(x, 8)
    w = torch.randint(-8, 8, (16, 6), dtype=torch.int8, generator=g)
    n = torch.ones(6)
    q = torch.randn(1, 2, 5, 16, generator=g)
    per_head = torch.full((2,), 0.05), torch.full((2,), 7.0)
    fq = dict(q=q, k=q.clone(), v=q.clone())
    fq_args = (fq["q"], fq["k"], fq["v"], *per_head, *per_head, torch.tensor([0.05]), torch.tensor([7.0]),
               torch.tensor([1.0]), None, None, None, None, 15, 0.25, 2, 4)
    out, f, m, l = ops.fq_attention.torch_fq_attention_forward(*fq_args)
    return {
        "quantize_asym": (x, 8, torch.tensor(0.05), torch.tensor(3.0)),
        "int8_gemm": (a, w, rowsum, s_x, c_x, n * 0.01, n, w.float().sum(0), None, torch.float32),
        "pack_weight_int4": (w,),
        "int8_linear": (x, w, 8, True, torch.tensor(1.0), torch.tensor(0.0), n * 0.01, n, w.float().sum(0), n, n, n),
        "quant_attention": (q, q.clone(), q.clone(), *per_head, *per_head, 0.05, 7.0, 4, 0.25, 1.0, 2, 4),
        "fake_quant_uniform": (q, torch.tensor([0.1, 0.2]), torch.tensor([3.0, 4.0]), 80, 4),
        "fake_quant_log": (torch.softmax(q, -1), 1.0, 2, torch.exp2(-torch.arange(16.0) / 2)),
        "fq_attention_fwd": fq_args,
        "fq_attention_bwd": (torch.randn(1, 2, 5, 16, generator=g), fq["q"], fq["k"], fq["v"], f, m, l,
                             *fq_args[3:]),
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS - {"quantize_per_token_int8", "fq_linear_fwd",
                                                        "fq_linear_bwd"}))
def test_library_op_passes_opcheck(name):
    """Schema, fake implementation and the real one agree (quantize_per_token_int8 and the
    fq_linear ops are checked in their own test files)."""
    args = _opcheck_args()[name]
    torch.library.opcheck(getattr(torch.ops.fastquant, name).default, args,
                          test_utils=("test_schema", "test_faketensor"))
