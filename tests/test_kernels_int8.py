"""Per-token int8 quantization: the reference, the op, and the Triton and CUDA kernels.

Quantization must be exact, so every backend is compared with the reference bit for bit.
Without a GPU the Triton kernel runs in Triton's CPU interpreter. TRITON_INTERPRET is read
when ``@triton.jit`` runs, that is when the kernel module is first imported, and other
tests in this process may already have imported it without the variable; so the
interpreter cases run in one child process started with TRITON_INTERPRET=1, and each
case is reported as its own test here.
"""

import pytest
import torch
from _interp import run_interpreted  # tests/_interp.py (the tests folder is on sys.path)
from _marks import gpu_marks, needs_gpu  # tests/_marks.py

from fastquant import backends
from fastquant.ops import quantize_per_token_int8, torch_quantize_per_token_int8



def tie_rows() -> torch.Tensor:
    """Rows whose values land exactly on .5 after scaling, plus an all-zero row."""
    halves = torch.cat([torch.tensor([127.0]), torch.arange(-126.5, 127.0, 1.0)])  # scale 1
    doubled = 2.0 * halves  # scale 2, the same quotients
    return torch.stack([halves, doubled, torch.zeros_like(halves)])


# name -> (code building x, keyword arguments of the Triton wrapper). Built in the child
# process from the same seed; shapes stay small because each interpreted program costs ms.
INTERPRETER_CASES = {
    "vit_s_197x384_fp32": ("torch.randn(197, 384)", {}),
    "3x65x1536_fp32": ("torch.randn(3, 65, 1536)", {}),
    "1x7_fp32": ("torch.randn(1, 7)", {}),
    "transposed_view_fp32": ("torch.randn(384, 197).t()", {}),
    "197x384_fp16": ("torch.randn(197, 384).half()", {}),
    "33x100_bf16": ("torch.randn(33, 100).bfloat16()", {}),
    "5x40_fp64": ("torch.randn(5, 40, dtype=torch.float64)", {}),
    "outliers_64x96_fp32": (
        "torch.randn(64, 96) * torch.where(torch.rand(64, 96) < 0.02, 50.0, 1.0)", {}),
    "chunked_9x300_fp32": ("torch.randn(9, 300)", {"block_n": 128}),
    "chunked_transposed_fp16": ("torch.randn(300, 5).t().half()", {"block_n": 64}),
    "ties_and_zeros": ("tie_rows()", {}),
    "no_rows_0x16": ("torch.randn(0, 16)", {}),
}

_CHILD = r"""
import importlib.util, json, sys
import torch
from fastquant.kernels import quant_int8
from fastquant.ops.quantize_int8 import torch_quantize_per_token_int8

# The case table and tie_rows() come from the test file itself (its path is argv[1]).
spec = importlib.util.spec_from_file_location("int8_cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
INTERPRETER_CASES, tie_rows = cases.INTERPRETER_CASES, cases.tie_rows

torch.manual_seed(0)
from triton.runtime import interpreter
import numpy
report = {"interpreted": quant_int8.INTERPRETED, "cases": {}, "numpy": numpy.__version__,
          "numpy_compat": getattr(interpreter._patch_lang_tensor, "_fastquant_numpy_compat", False)}
for name, (code, kwargs) in INTERPRETER_CASES.items():
    x = eval(code)
    q, scale = quant_int8.triton_quantize_per_token_int8(x, **kwargs)
    q_ref, scale_ref = torch_quantize_per_token_int8(x)
    report["cases"][name] = {
        "shape": list(x.shape),
        "contiguous": x.is_contiguous(),
        "q_shape_ok": q.shape == x.shape and q.dtype == torch.int8,
        "scale_shape_ok": scale.shape == x.shape[:-1] and scale.dtype == torch.float32,
        "q_equal": torch.equal(q, q_ref),
        "scale_equal": torch.equal(scale, scale_ref),
        "q_mismatches": int((q != q_ref).sum()) if q.shape == q_ref.shape else -1,
    }
json.dump(report, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreter_report():
    return run_interpreted(_CHILD, __file__)


# --- the reference ------------------------------------------------------------------


def test_reference_matches_hand_computed_example():
    x = torch.tensor([
        [127.0, -63.5, 0.5, 1.5, 2.5, -2.5],   # scale 1: ties go to the even integer
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],        # all zero: the scale floor, not 0/0
        [254.0, -1.0, 3.0, 0.0, 0.0, 0.25],    # scale 2: -0.5 -> 0, 1.5 -> 2, 0.125 -> 0
    ])
    q, scale = torch_quantize_per_token_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(q, torch.tensor([
        [127, -64, 0, 2, 2, -2],
        [0, 0, 0, 0, 0, 0],
        [127, 0, 2, 0, 0, 0],
    ], dtype=torch.int8))
    assert torch.equal(scale, torch.tensor([1.0, 1e-8, 2.0], dtype=torch.float32))


def test_reference_shapes_and_range():
    x = torch.randn(2, 3, 50, dtype=torch.float16, generator=torch.Generator().manual_seed(9))
    q, scale = torch_quantize_per_token_int8(x)
    assert q.shape == (2, 3, 50) and scale.shape == (2, 3)
    assert q.is_contiguous()
    # Every row reaches +-127 at its largest magnitude, and -128 never appears.
    assert torch.equal(q.abs().amax(dim=-1), torch.full((2, 3), 127, dtype=torch.int8))
    assert int(q.min()) >= -127
    # Dequantizing is within half a step of the input, plus the float32 rounding of q * scale
    # (half an ulp of |x|): an input on a tie (x / scale = 63.5 for this seed) sits exactly
    # half a step away, and the rounding can add to that.
    err = (q.float() * scale[..., None] - x.float()).abs()
    assert bool((err <= scale[..., None] / 2 + 2.0 ** -23 * x.float().abs()).all())


def test_reference_ties():
    q, scale = torch_quantize_per_token_int8(tie_rows())
    expected = torch.round(torch.cat([torch.tensor([127.0]), torch.arange(-126.5, 127.0, 1.0)]))
    assert torch.equal(scale, torch.tensor([1.0, 2.0, 1e-8]))
    assert torch.equal(q[0], expected.to(torch.int8))
    assert torch.equal(q[1], q[0])
    assert not q[2].any()


# --- the op ----------------------------------------------------------------------------


DEVICES = ["cpu", pytest.param("cuda", marks=gpu_marks())]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_op_matches_reference(device, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 197, 96, dtype=dtype)
    q_ref, scale_ref = torch_quantize_per_token_int8(x)
    q, scale = quantize_per_token_int8(x.to(device))
    assert q.device.type == device
    assert torch.equal(q.cpu(), q_ref) and torch.equal(scale.cpu(), scale_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_op_non_contiguous(device):
    x = torch.randn(96, 3, 65).permute(1, 2, 0)
    q, scale = quantize_per_token_int8(x.to(device))
    q_ref, scale_ref = torch_quantize_per_token_int8(x.contiguous())
    assert torch.equal(q.cpu(), q_ref) and torch.equal(scale.cpu(), scale_ref)


def test_op_registration_is_consistent():
    # Schema, fake (meta) implementation and autograd registration agree with the real one.
    torch.library.opcheck(torch.ops.fastquant.quantize_per_token_int8.default,
                          (torch.randn(3, 5, 8),))


def test_op_traces_under_torch_compile():
    def fn(x):
        q, scale = quantize_per_token_int8(x)
        return q.float() * scale[..., None]

    x = torch.randn(4, 7, 32)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), fn(x))


@pytest.mark.parametrize("bad, error, message", [
    (torch.ones(3, 4, dtype=torch.int32), TypeError,
     "quantize_per_token_int8: expected a floating-point tensor, got torch.int32"),
    (torch.tensor(1.0), ValueError,
     "quantize_per_token_int8: expected shape [..., N] with N > 0, got ()"),
    (torch.ones(3, 0), ValueError,
     "quantize_per_token_int8: expected shape [..., N] with N > 0, got (3, 0)"),
    ([1.0, 2.0], TypeError, "quantize_per_token_int8: expected a torch.Tensor, got list"),
])
def test_op_rejects_bad_input_in_one_line(bad, error, message):
    with pytest.raises(error) as info:
        quantize_per_token_int8(bad)
    assert str(info.value) == message


# --- Triton, through the CPU interpreter ----------------------------------------------


def test_interpreter_really_interprets(interpreter_report):
    assert interpreter_report["interpreted"]
    # fastquant.kernels lets Triton 3.6's interpreter run with numpy >= 2.4 (its int() of
    # one-element arrays); the cases below, with run-time loop bounds, need it there.
    assert interpreter_report["numpy_compat"], interpreter_report["numpy"]


@pytest.mark.parametrize("case", list(INTERPRETER_CASES))
def test_triton_interpreter_matches_reference_exactly(interpreter_report, case):
    result = interpreter_report["cases"][case]
    assert result["q_shape_ok"] and result["scale_shape_ok"], result
    assert result["scale_equal"], result
    assert result["q_equal"], result


def test_triton_wrapper_rejects_bad_input():
    pytest.importorskip("triton")
    from fastquant.kernels import quant_int8

    with pytest.raises(TypeError, match=r"^triton_quantize_per_token_int8: expected a "
                                        r"floating-point tensor, got torch.int8$"):
        quant_int8.triton_quantize_per_token_int8(torch.ones(2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="block_n must be a positive power of two, got 48"):
        quant_int8.triton_quantize_per_token_int8(torch.ones(2, 2), block_n=48)
    if not quant_int8.INTERPRETED:
        with pytest.raises(ValueError, match="expected CUDA tensors, got device cpu"):
            quant_int8.triton_quantize_per_token_int8(torch.ones(2, 2))


# --- GPU backends ----------------------------------------------------------------------

GPU_SHAPES = [(197, 384), (3, 65, 1536), (1, 7), (32 * 197, 768), (4, 8192), (2, 50, 3072)]
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gpu_cases():
    torch.manual_seed(0)
    for shape in GPU_SHAPES:
        for dtype in GPU_DTYPES:
            yield torch.randn(shape).to(dtype)
    yield torch.randn(768, 197).t()  # transposed view
    yield tie_rows()


@needs_gpu
def test_triton_on_gpu_matches_reference_exactly():
    pytest.importorskip("triton")
    from fastquant.kernels.quant_int8 import triton_quantize_per_token_int8

    for x in _gpu_cases():
        q_ref, scale_ref = torch_quantize_per_token_int8(x)
        q, scale = triton_quantize_per_token_int8(x.cuda())
        assert torch.equal(scale.cpu(), scale_ref), (tuple(x.shape), x.dtype)
        assert torch.equal(q.cpu(), q_ref), (tuple(x.shape), x.dtype)
    # The chunked path, forced on rows that would fit in one tile.
    x = torch.randn(33, 1000)
    q, scale = triton_quantize_per_token_int8(x.cuda(), block_n=256)
    q_ref, scale_ref = torch_quantize_per_token_int8(x)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(scale.cpu(), scale_ref)


@needs_gpu
@pytest.mark.skipif(not backends.CUDA_EXT_AVAILABLE, reason=backends.CUDA_EXT_REASON or "n/a")
def test_cuda_extension_matches_reference_exactly():
    from fastquant import _C

    for x in _gpu_cases():
        q_ref, scale_ref = torch_quantize_per_token_int8(x)
        q, scale = _C.quantize_per_token_int8(x.cuda().contiguous())
        assert torch.equal(scale.cpu(), scale_ref), (tuple(x.shape), x.dtype)
        assert torch.equal(q.cpu(), q_ref), (tuple(x.shape), x.dtype)


@needs_gpu
@pytest.mark.skipif(not backends.CUDA_EXT_AVAILABLE, reason=backends.CUDA_EXT_REASON or "n/a")
def test_cuda_extension_checks_its_input():
    from fastquant import _C

    with pytest.raises(RuntimeError, match="expected a contiguous tensor"):
        _C.quantize_per_token_int8(torch.randn(64, 32, device="cuda").t())
    with pytest.raises(RuntimeError, match="expected float32, float16 or bfloat16"):
        _C.quantize_per_token_int8(torch.randn(4, 8, device="cuda", dtype=torch.float64))
    with pytest.raises(RuntimeError, match="expected a CUDA tensor"):
        _C.quantize_per_token_int8(torch.randn(4, 8))


@needs_gpu
def test_reference_on_gpu_matches_cpu():
    # The reference avoids division by a Python scalar, which CUDA PyTorch turns into a
    # multiplication by the reciprocal; so it is exact on every device.
    for x in _gpu_cases():
        q_ref, scale_ref = torch_quantize_per_token_int8(x)
        q, scale = torch_quantize_per_token_int8(x.cuda())
        assert torch.equal(scale.cpu(), scale_ref) and torch.equal(q.cpu(), q_ref)
