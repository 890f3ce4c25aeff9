"""The CUDA kernels (csrc/cuda/*_kernel.cu), executed: on the CPU through the emulation layer
of tests/cuda_emu (``emulated``, always), and on a GPU through the CUDA build (``cuda``, where
torch sees a device and the extension has CUDA kernels), with the same cases.

Emulated: the sources are compiled unchanged with g++ (after the launch-syntax rewrite of
tests/cuda_emu/emu_harness.py) into a library whose real launchers (csrc/cuda/kernels.h) are
called with exact-size CPU buffers, outputs and workspaces filled with garbage first. Every
op, forward and backward, all four dtypes, against the plain-PyTorch reference
(adarts_kernels/ops/reference.py): odd shapes, B = 0 / 1, C = 1, n = C, ties, NaN / inf
windows, stride 1 and 2, training and eval, the vector paths and (one element off an aligned
start) the scalar paths. A build under AddressSanitizer + UBSan runs a smaller set in a
subprocess; ThreadSanitizer (concurrent threads) is opt-in: ADARTS_EMU_TSAN=1. Three injected
bugs show that the emulation catches what it is for.

Adversarial schedules: the emulator runs a block's threads one at a time, by default in a fixed
round-robin order, which hides most missing barriers. ``test_schedules`` runs every block-mode
and warp-mode reduction path (``schedule_cases``) under reverse and seeded random thread orders
per barrier interval and with shared-memory stores delayed to the next barrier (emu_harness.
SCHEDULES); ``test_every_barrier_is_needed`` (opt-in: ADARTS_EMU_BARRIER_PROBE=1) removes each
``__syncthreads()`` of csrc/cuda in turn and expects those cases to fail.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emu_harness as H  # noqa: E402

from adarts_kernels.ops import reference as R  # noqa: E402

HERE = Path(__file__).resolve().parent
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOL = {  # as tests/ops/helpers.py: one rounding at the end, sums in another order
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


# ----------------------------------------------------------------------------- devices

def cuda_unavailable():
    """Why the ``cuda`` device cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    from adarts_kernels import _ext
    if not _ext.has_cuda_kernels():
        return f"the extension has no CUDA kernels ({_ext.EXT_ERROR or 'CPU-only build'})"
    return None


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emu")


@pytest.fixture(scope="session")
def emu_lib(emu_dir):
    return H.build(emu_dir)


DEVICES = [pytest.param("emulated", id="emulated"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def dev(request):
    if request.param == "cuda":
        reason = cuda_unavailable()
        if reason is not None:
            pytest.skip(reason)
        return H.Cuda()
    return H.Emulated(request.getfixturevalue("emu_lib"))


# ----------------------------------------------------------------------------- inputs and checks

def randn(shape, g, dtype, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def close(actual, expected, dtype, what, equal_nan=False, scale=1.0):
    """Within TOL of ``dtype``; ``atol`` times ``scale`` (sums over many terms). No NaN in
    ``actual`` where ``expected`` has none (an element left unwritten shows as NaN)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, equal_nan=equal_nan,
                               msg=lambda m: f"{what}: {m}")


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# 1. scoring ------------------------------------------------------------------------------

def check_score(dev, dtype, B, C, H, W, n, seed=0, ties=False, nan=False):
    g = torch.Generator().manual_seed(seed)
    Ch = max(C // 2, 1)
    x = randn((B, C, H, W), g, dtype)
    w1 = randn((Ch, C), g, dtype, 1 / math.sqrt(C))
    w2 = randn((C, Ch), g, dtype, 1 / math.sqrt(Ch))
    if ties and C >= 4:  # equal scores: channels 1, 2 and 3 share w2's row of channel 0
        w2[1:4] = w2[0]
    if nan and B > 0:  # a NaN pool: its channel's score is NaN, ranked above everything
        x[0, C - 1, 0, 0] = float("nan")
    a, idx = dev.attention_score_fwd(x, w1, w2, n)
    ra, ridx = R.attention_score_fwd(x, w1, w2, n)
    close(a, ra, dtype, "a", equal_nan=nan)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    if ties or nan or dtype == torch.float64 or B == 0:
        assert idx.tolist() == ridx.tolist(), f"idx {idx.tolist()} vs {ridx.tolist()}"
    else:  # positions may swap only between scores equal within the summation-order error
        s = ra.to(acc(dtype)).sum(0)
        assert sorted(idx.tolist()) == sorted(set(idx.tolist())) and all(0 <= i < C for i in idx.tolist())
        assert (s[idx] - s[ridx]).abs().max().item() <= 1e-5 * max(B, 1), (idx.tolist(), ridx.tolist())
    if nan:
        return
    grad_a = randn((B, C), g, dtype)
    dx, dw1, dw2 = dev.attention_score_bwd(grad_a, x, w1, w2, ra)
    rdx, rdw1, rdw2 = R.attention_score_bwd(grad_a, x, w1, w2, ra)
    close(dx, rdx, dtype, "dx")
    close(dw1, rdw1, dtype, "dw1", scale=max(B, 1))
    close(dw2, rdw2, dtype, "dw2", scale=max(B, 1))


# 2. gather -------------------------------------------------------------------------------

def check_gather(dev, dtype, B, C, H, W, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn((B, C, H, W), g, dtype)
    a = (torch.rand(B, C, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(dtype)
    idx = torch.randperm(C, generator=g)[:n]
    out = dev.attention_gather_fwd(x, a, idx)
    close(out, R.attention_gather_fwd(x, a, idx), dtype, "out")
    grad = randn((B, n, H, W), g, dtype)
    dx, da = dev.attention_gather_bwd(grad, x, a, idx)
    rdx, rda = R.attention_gather_bwd(grad, x, a, idx)
    close(dx, rdx, dtype, "dx")
    close(da, rda, dtype, "da", scale=math.sqrt(H * W))


# 3. write-back ---------------------------------------------------------------------------

def check_writeback(dev, dtype, B, C, H, W, n, stride, beta, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = H // stride, W // stride
    x = randn((B, C, H, W), g, dtype)
    if nan and x.numel():  # NaN and inf in pooling windows (and a window of -inf)
        flat = x.view(-1)
        flat[:: 7] = float("nan")
        flat[3:: 11] = float("inf")
        x[0, 0, :2, :2] = float("-inf")
    a = (torch.rand(B, C, generator=g, dtype=torch.float64) * 0.9 + 0.05).to(dtype)
    idx = torch.randperm(C, generator=g)[:n]
    if nan:  # non-finite values on bypass channels only: the reference's masked products
        # (0 * NaN) would make da and dbeta of a selected channel NaN where the kernels skip it
        x[:, idx] = randn((B, n, H, W), g, dtype)
    y = randn((B, n, Ho, Wo), g, dtype)
    bt = (torch.rand((), generator=g, dtype=torch.float64) + 0.5).to(dtype) if beta else None
    out = dev.attention_writeback_fwd(x, a, idx, y, bt, stride)
    close(out, R.attention_writeback_fwd(x, a, idx, y, bt, stride), dtype, "out", equal_nan=nan)
    grad = randn((B, C, Ho, Wo), g, dtype)
    dx, da, dy, dbeta = dev.attention_writeback_bwd(grad, x, a, idx, y, bt, stride)
    rdx, rda, rdy, rdbeta = R.attention_writeback_bwd(grad, x, a, idx, y, bt, stride)
    close(dx, rdx, dtype, "dx", equal_nan=nan)
    close(da, rda, dtype, "da", equal_nan=nan, scale=math.sqrt(Ho * Wo + 1))
    close(dy, rdy, dtype, "dy")
    if beta:
        close(dbeta, rdbeta, dtype, "dbeta", equal_nan=nan, scale=math.sqrt(B * C * Ho * Wo + 1))
    else:
        assert dbeta is None


# 4. mixed sum ----------------------------------------------------------------------------

EPS = 1e-5


def check_mixed(dev, dtype, B, n, H, W, stride, P, identity, training, seed=0, ties=False, nan=False):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = H // stride, W // stride
    if ties:  # few distinct values: many equal maxima in every window
        x = torch.randint(-1, 2, (B, n, H, W), generator=g).to(dtype)
    else:
        x = randn((B, n, H, W), g, dtype)
    if nan and x.numel():
        x.view(-1)[5:: 13] = float("nan")
        x.view(-1)[2:: 17] = float("-inf")
    z = [(randn((B, n, Ho, Wo), g, torch.float64) * (1 + 0.5 * i) + 0.3 * i).to(dtype) for i in range(P)]
    w = torch.softmax(randn((P + 3,), g, torch.float64), 0).to(dtype)
    pw, zw = w[:2].clone(), w[2:2 + P].clone()
    iw = w[2 + P].clone() if identity else None
    sd = acc(dtype)
    rm = (randn((P + 2, n), g, torch.float64) * 0.3).to(sd)
    rv = (torch.rand(P + 2, n, generator=g, dtype=torch.float64) + 0.5).to(sd)
    run = (None, None) if training else (rm, rv)
    y, mean, var = dev.mixed_sum_fwd(z, x, zw, pw, iw, stride, EPS, *run)
    ry, rmean, rvar = R.mixed_sum_fwd(z, x, zw, pw, iw, stride, EPS, *run)
    N = max(B * Ho * Wo, 1)
    close(mean, rmean, sd, "mean", equal_nan=True, scale=4)
    close(var, rvar, sd, "var", equal_nan=True, scale=4)
    # a batch statistic is a sum over N terms: y inherits its error through (u - mean) * rstd
    close(y, ry, dtype, "y", equal_nan=nan or B == 0, scale=1 + math.sqrt(N) * (dtype == torch.float32))
    grad = randn((B, n, Ho, Wo), g, dtype)
    dz, dx, dzw, dpw, diw = dev.mixed_sum_bwd(grad, z, x, zw, pw, iw, rmean, rvar, stride, EPS, training)
    rdz, rdx, rdzw, rdpw, rdiw = R.mixed_sum_bwd(grad, z, x, zw, pw, iw, rmean, rvar, stride, EPS, training)
    s = 1 + math.sqrt(N) * (dtype == torch.float32)
    for i, (o, r) in enumerate(zip(dz, rdz)):
        close(o, r, dtype, f"dz[{i}]", equal_nan=nan, scale=s)
    close(dx, rdx, dtype, "dx", equal_nan=nan, scale=s)
    close(dzw, rdzw, dtype, "dz_weights", equal_nan=nan, scale=math.sqrt(N * n))
    close(dpw, rdpw, dtype, "dpool_weights", equal_nan=nan, scale=math.sqrt(N * n))
    close(diw, rdiw.reshape(()).to(dtype), dtype, "didentity_weight", equal_nan=nan, scale=math.sqrt(N * n))


# ----------------------------------------------------------------------------- case lists

# (B, C, H, W, n): small planes (one warp each, 16-byte vectors), n = C, one block per plane
# (17x17: scalar; 32x36: vectors in float32 / float64), the forward's tiles over gridDim.y
# (70x61), several GEMM tiles (C = 33), C = 1, B = 1, B = 0.
SCORE = [(2, 8, 4, 4, 3), (3, 10, 5, 7, 10), (1, 3, 17, 17, 2), (1, 2, 32, 36, 1), (1, 33, 2, 1, 17), (1, 1, 3, 3, 1),
         (0, 6, 4, 4, 3)]
GATHER = [(2, 5, 4, 4, 3), (3, 7, 5, 3, 7), (1, 3, 17, 17, 2), (1, 2, 32, 36, 1), (1, 2, 70, 61, 1), (2, 1, 4, 4, 1),
          (0, 4, 4, 4, 2)]
# (B, C, H, W, n, stride): W % 4 (the vector paths) and odd H / W at stride 1, one output row
# at stride 2 (which takes even H and W), n = C, one block per plane, 1x1 planes, B = 0.
# Every case is valid for the bindings too (the cuda device).
WRITEBACK = [(2, 6, 8, 8, 3, 1), (2, 5, 7, 9, 2, 1), (1, 2, 44, 40, 1, 1), (3, 8, 5, 5, 8, 1), (1, 1, 1, 1, 1, 1),
             (2, 6, 8, 8, 3, 2), (2, 5, 6, 10, 2, 2), (2, 4, 2, 14, 2, 2), (1, 2, 44, 40, 1, 2), (3, 8, 4, 4, 8, 2),
             (0, 4, 4, 4, 2, 2)]
# (B, n, H, W, stride, P, identity): the search-space edges and P = 0, 1, 5; one block per
# plane (17x16 outputs at both strides); 1x1 planes; n = 1; B = 0 (NaN batch statistics, as torch)
MIXED = [(2, 3, 7, 5, 1, 4, True), (3, 2, 4, 8, 1, 0, False), (1, 2, 17, 16, 1, 1, True), (2, 1, 1, 1, 1, 5, True),
         (2, 3, 8, 10, 2, 5, False), (3, 2, 2, 4, 2, 0, False), (1, 2, 34, 32, 2, 1, False), (0, 2, 4, 4, 1, 1, True)]
MIXED_EVAL = [(2, 3, 7, 5, 1, 4, True), (3, 2, 4, 8, 1, 0, False), (2, 3, 8, 10, 2, 2, False)]


def ids(cases):
    return ["x".join(map(str, c)) for c in cases]


def dtype_id(d):
    return str(d).replace("torch.", "")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", SCORE, ids=ids(SCORE))
def test_attention_score(dev, dtype, case):
    check_score(dev, dtype, *case, seed=sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", GATHER, ids=ids(GATHER))
def test_attention_gather(dev, dtype, case):
    check_gather(dev, dtype, *case, seed=sum(case))


@pytest.mark.parametrize("beta", [True, False], ids=["beta", "nobeta"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", WRITEBACK, ids=ids(WRITEBACK))
def test_attention_writeback(dev, dtype, case, beta):
    check_writeback(dev, dtype, *case, beta=beta, seed=sum(case))


@pytest.mark.filterwarnings("ignore:var_mean")  # B = 0: the reference's statistics of nothing
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MIXED, ids=ids(MIXED))
def test_mixed_sum(dev, dtype, case):
    check_mixed(dev, dtype, *case, training=True, seed=sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", MIXED_EVAL, ids=ids(MIXED_EVAL))
def test_mixed_sum_eval(dev, dtype, case):
    """Running statistics read instead of batch statistics written (the forward skips the
    statistics kernels, the backward the channel means)."""
    check_mixed(dev, dtype, *case, training=False, seed=sum(case))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_scalar_paths(dev, dtype):
    """Every pointer one element past an aligned start: no 16-byte vector path applies."""
    d = dev.with_offset(True)
    check_score(d, dtype, 2, 8, 4, 4, 3, seed=1)
    check_gather(d, dtype, 2, 5, 4, 4, 3, seed=2)
    check_writeback(d, dtype, 2, 6, 8, 8, 3, 1, beta=True, seed=3)
    check_writeback(d, dtype, 2, 6, 8, 8, 3, 2, beta=True, seed=4)
    check_mixed(d, dtype, 2, 3, 8, 10, 2, 5, False, True, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_ties_and_nonfinite(dev, dtype):
    """Equal scores (the lower channel first), a NaN score (ranked first), NaN / inf in the
    pooling windows (a NaN is the window's maximum), windows of equal maxima."""
    check_score(dev, dtype, 3, 8, 4, 4, 5, seed=6, ties=True)
    check_score(dev, dtype, 2, 6, 4, 4, 3, seed=7, nan=True)
    check_writeback(dev, dtype, 2, 4, 8, 8, 2, 2, beta=True, seed=8, nan=True)
    check_writeback(dev, dtype, 2, 4, 6, 6, 2, 1, beta=True, seed=9, nan=True)
    for training in (True, False):
        check_mixed(dev, dtype, 2, 3, 6, 8, 1, 1, True, training, seed=10, ties=True)
        check_mixed(dev, dtype, 2, 3, 6, 8, 2, 1, False, training, seed=11, nan=True)


def test_half_conversions_bit_exact(emu_lib):
    """float -> float16 / bfloat16 (round to nearest even) and float16 -> float as torch does,
    bit for bit: every 16-bit pattern, the midpoints between neighbours, random floats."""
    import ctypes
    lib = ctypes.CDLL(str(emu_lib))
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    h = bits.view(torch.float16)
    f = torch.empty(1 << 16, dtype=torch.float32)
    lib.emu_half_to_float(ctypes.c_void_p(h.data_ptr()), ctypes.c_void_p(f.data_ptr()), ctypes.c_int64(1 << 16))
    assert torch.equal(f.view(torch.int32), h.float().view(torch.int32)) or \
        torch.equal(f[~f.isnan()], h.float()[~f.isnan()])
    g = torch.Generator().manual_seed(0)
    fin = h.float()[~h.float().isnan()]
    mid = (fin[:-1].double() + fin[1:].double()) / 2  # midpoints of neighbours: the ties
    vals = torch.cat([fin, mid.float(), torch.randn(200000, generator=g) * 1e3, torch.randn(200000, generator=g) * 1e-6,
                      torch.tensor([float("inf"), -float("inf"), 65519.0, 65520.0, 1e-8, -0.0])])
    for fn, dt in (("emu_float_to_half", torch.float16), ("emu_float_to_bfloat16", torch.bfloat16)):
        out = torch.empty(vals.numel(), dtype=torch.int16)
        getattr(lib, fn)(ctypes.c_void_p(vals.data_ptr()), ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(vals.numel()))
        ref = vals.to(dt).view(torch.int16)
        bad = (out != ref).nonzero().flatten()
        assert bad.numel() == 0, f"{dt}: {bad.numel()} mismatches, e.g. {vals[bad[:3]].tolist()}"


# ----------------------------------------------------------------------------- the emulator's checks

SELFTEST = [  # (which, error code, words of the message): tests/cuda_emu/selftest.cu
    (1, 719, ["two_barriers_kernel", "divergent __syncthreads"]),
    (2, 719, ["exit_before_barrier_kernel", "divergent __syncthreads", "exited"]),
    (3, 719, ["exit_before_shuffle_kernel", "__shfl_xor_sync", "lane 7", "exited"]),
    (4, 719, ["mask_mismatch_kernel", "(mask 0xffffffff)", "lane 15"]),  # lanes 0-15 went on with their own mask
    (5, 719, ["read_outside_mask_kernel", "not in the mask"]),
    (6, 719, ["partial_warp_kernel", "does not exist"]),
    (7, 719, ["deadlock_kernel", "deadlock"]),
    (8, 702, ["spin_kernel", "no progress"]),
    (9, 710, ["assert_kernel", "device assert", "selftest: not 12345"]),
    (10, 716, ["misaligned_kernel", "misaligned address", "16-byte alignment"]),
    (11, 9, ["write_kernel", "block (1025,1,1)"]),
    (12, 9, ["write_kernel", "grid (1,65536,1)"]),
    (13, 9, ["write_kernel", "grid (2147483648,1,1)"]),
    (14, 9, ["write_kernel", "zero-size launch"]),
    (15, 1, ["dynamic_smem_kernel", "65536 bytes of dynamic shared memory"]),
    (17, 9, ["write_kernel", "block (8,8,65)"]),
]


@pytest.fixture(scope="session")
def selftest_lib(emu_dir):
    import ctypes
    lib = ctypes.CDLL(str(H.build(emu_dir, ops=(), extra=[HERE / "cuda_emu" / "selftest.cu"])))
    lib.emu_message.restype = ctypes.c_char_p
    return lib


def selftest_run(lib, which):
    buf = torch.zeros(1024, dtype=torch.int32)
    lib.emu_reset()
    code = lib.emu_selftest(which, ctypes_ptr(buf))
    return code, lib.emu_message().decode(), buf


def ctypes_ptr(t):
    import ctypes
    return ctypes.c_void_p(t.data_ptr())


def test_emulator_runs_correct_kernels(selftest_lib):
    """Shared memory, barriers, shuffles and dynamic shared memory give CUDA's results."""
    code, msg, buf = selftest_run(selftest_lib, 0)
    assert code == 0, msg
    assert buf[:3].tolist() == [sum(range(256))] * 3
    code, msg, buf = selftest_run(selftest_lib, 16)
    assert code == 0, msg
    assert buf[:64].tolist() == list(range(63, -1, -1))


@pytest.mark.parametrize("which,code,words", SELFTEST, ids=[w[0] for _, _, w in SELFTEST])
def test_emulator_reports(selftest_lib, monkeypatch, which, code, words):
    """Each defect fails its launch with the CUDA error code and a message naming the kernel."""
    monkeypatch.setenv("ADARTS_EMU_TIMEOUT", "0.3")
    got, msg, _ = selftest_run(selftest_lib, which)
    assert got == code, (got, msg)
    for w in words:
        assert w in msg, (w, msg)
    # the emulator is usable afterwards
    ok, msg, buf = selftest_run(selftest_lib, 0)
    assert ok == 0 and buf[0].item() == sum(range(256)), msg


# ----------------------------------------------------------------------------- injected bugs

def test_injected_missing_barrier_is_a_mismatch(emu_dir):
    """(a) gemm_kernel without the __syncthreads between storing a K slab and reading it. A
    race has no error of its own: the symptom is a wrong result. The serial schedule makes it
    deterministic (thread 0 reads the tile before the others stored theirs) and the poisoned
    shared memory makes the unwritten values NaN; the same case passes without the injection."""
    dev = H.Emulated(H.build(emu_dir, ops=("attention_score",), inject="drop_sync"))
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        check_score(dev, torch.float32, 2, 8, 4, 4, 3, seed=1)


def test_injected_lane_exit_is_reported(emu_dir):
    """(b) one lane of each group returns before the reduction's shuffles in
    gather_bwd_kernel: the emulator fails the launch and names the kernel and the lane."""
    dev = H.Emulated(H.build(emu_dir, ops=("attention_gather",), inject="lane_exit"))
    with pytest.raises(H.LaunchError) as e:
        check_gather(dev, torch.float32, 2, 5, 4, 4, 3, seed=2)
    assert e.value.code == 719
    assert "gather_bwd_kernel" in e.value.message and "lane 5" in e.value.message and "exited" in e.value.message


def test_injected_misaligned_vector_load_is_reported(emu_dir):
    """(c) the alignment test passes 4-byte aligned pointers to the 16-byte vector path of
    gather_fwd_kernel: the emulator reports the misaligned address (cudaErrorMisalignedAddress)."""
    dev = H.Emulated(H.build(emu_dir, ops=("attention_gather",), inject="misalign")).with_offset(True)
    with pytest.raises(H.LaunchError) as e:
        check_gather(dev, torch.float32, 2, 5, 4, 4, 3, seed=3)
    assert e.value.code == 716
    assert "gather_fwd_kernel" in e.value.message and "misaligned address" in e.value.message


# ----------------------------------------------------------------------------- adversarial schedules

#: Run by test_schedules (beyond the default order): reverse, two random orders, stores delayed.
ADVERSARIAL = ("reverse", "random:1", "random:2", "serial+delayed", "random:3+delayed")


def schedule_score(dev):
    """Pools in block mode (17x17 scalar: 289 units; 32x36 float32 vectors: 288) with block_sum
    then block_argmax on one shared array, the first GEMM with K = C = 18 (two slabs), the rank
    kernel's shared staging; warp mode (4x4)."""
    check_score(dev, torch.float32, 1, 18, 17, 17, 5, seed=21)
    check_score(dev, torch.float32, 1, 2, 32, 36, 1, seed=22)
    check_score(dev, torch.float32, 2, 8, 4, 4, 3, seed=23)


def schedule_gather(dev):
    """Backward block_sum (70x61 scalar: 4270 units; 32x36 vectors: 288), warp mode."""
    check_gather(dev, torch.float32, 1, 2, 70, 61, 1, seed=24)
    check_gather(dev, torch.float32, 1, 3, 32, 36, 2, seed=25)
    check_gather(dev, torch.float32, 2, 5, 4, 4, 3, seed=26)


def schedule_writeback(dev):
    """Backward: two block_sums in a row on one shared array (44x40, stride 1: 440 vector
    units; stride 2, one element off: 440 scalar units), dbeta's 1024-thread block; warp mode
    at both strides."""
    check_writeback(dev, torch.float32, 1, 2, 44, 40, 1, 1, beta=True, seed=27)
    check_writeback(dev.with_offset(True), torch.float32, 1, 2, 44, 40, 1, 2, beta=True, seed=28)
    check_writeback(dev, torch.float32, 2, 6, 8, 8, 3, 1, beta=False, seed=29)
    check_writeback(dev, torch.float32, 2, 5, 6, 10, 2, 2, beta=True, seed=30)


def schedule_mixed(dev):
    """stats_kernel (two block_sums per pool and z), bwd_partial_kernel (one per column),
    dw_kernel, at both strides (17x16 outputs: 272 units); warp mode."""
    check_mixed(dev, torch.float32, 1, 2, 17, 16, 1, 1, True, True, seed=31)
    check_mixed(dev, torch.float32, 1, 2, 34, 32, 2, 2, False, True, seed=32)
    check_mixed(dev, torch.float32, 2, 3, 7, 5, 1, 4, True, True, seed=33)


#: op -> its cases for the schedules: every reduction path of every op in block mode (a plane
#: of more than 256 units: 256 threads, block_sum / block_argmax through shared memory) and in
#: warp mode, the inverse index maps, float32 vector paths and (one element off) scalar paths.
SCHEDULE_CASES = {"attention_score": schedule_score, "attention_gather": schedule_gather,
                  "attention_writeback": schedule_writeback, "mixed_sum": schedule_mixed}


def schedule_cases(dev):
    """All of SCHEDULE_CASES (the ThreadSanitizer run's extra shapes)."""
    for cases in SCHEDULE_CASES.values():
        cases(dev)


@pytest.mark.parametrize("schedule", ADVERSARIAL)
@pytest.mark.parametrize("op", list(SCHEDULE_CASES))
def test_schedules(emu_lib, op, schedule):
    """The block-mode and warp-mode paths of ``op`` under an adversarial schedule: a missing
    __syncthreads gives a wrong result (or a write-write race error) here where the default
    order may hide it."""
    SCHEDULE_CASES[op](H.Emulated(emu_lib, schedule=schedule))


def test_schedule_setting(emu_lib):
    """An unknown schedule fails the launch with a message (no silent fallback)."""
    dev = H.Emulated(emu_lib, schedule="sideways")
    with pytest.raises(H.LaunchError, match="unknown schedule"):
        check_gather(dev, torch.float32, 2, 5, 4, 4, 3, seed=1)
    with pytest.raises(H.LaunchError, match="unknown schedule"):
        check_gather(dev.with_schedule("free+delayed"), torch.float32, 2, 5, 4, 4, 3, seed=1)


#: Barriers that no schedule can miss today, each by the code that follows it (file -> the
#: next statement) and why: the trailing barrier of block_argmax guards the reuse of its shared
#: arrays, and its only caller (pools_kernel) ends right after it.
REDUNDANT_BARRIERS = {("attention_score_kernel.cu", "v = tv; i = ti;"):
                      "block_argmax's trailing barrier: no reuse of sv / si after it in pools_kernel"}


def redundant_barrier(where):
    fname, line = where
    lines = (H.CUDA_DIR / fname).read_text().splitlines()
    after = next((t.strip() for t in lines[line:] if t.strip()), "")
    return REDUNDANT_BARRIERS.get((fname, after))


@pytest.mark.skipif(os.environ.get("ADARTS_EMU_BARRIER_PROBE") != "1",
                    reason="one build per barrier (slow): ADARTS_EMU_BARRIER_PROBE=1")
@pytest.mark.parametrize("where", H.barriers(), ids=[f"{f}:{line}" for f, line in H.barriers()])
def test_every_barrier_is_needed(emu_dir, where):
    """Each __syncthreads() of csrc/cuda removed in turn (in the rewritten copy): the default
    order and the adversarial schedules together must fail schedule_cases (the cases of
    test_schedules), except for the barriers of REDUNDANT_BARRIERS."""
    lib = H.build(emu_dir, no_barrier=where)
    caught = []
    for schedule in ("serial",) + ADVERSARIAL:
        for op, cases in SCHEDULE_CASES.items():
            try:
                cases(H.Emulated(lib, schedule=schedule))
            except (AssertionError, H.LaunchError):
                caught.append(f"{op} [{schedule}]")
    print(f"{where[0]}:{where[1]} caught by: {', '.join(caught) or 'nothing'}")
    why = redundant_barrier(where)
    if why is not None:
        assert not caught, f"{where[0]}:{where[1]} is listed as redundant ({why}) but is needed now: {caught}"
        pytest.skip(f"redundant: {why}")
    assert caught, f"{where[0]}:{where[1]}: no schedule fails without this barrier"


# ----------------------------------------------------------------------------- sanitizers

def sanitized_cases(dev):
    """The cases of the sanitizer builds: every op and both paths, fewer shapes."""
    for dtype in (torch.float32, torch.float16):
        check_score(dev, dtype, 2, 8, 4, 4, 3, seed=1)
        check_score(dev, dtype, 1, 3, 17, 17, 2, seed=2)
        check_gather(dev, dtype, 2, 5, 4, 4, 3, seed=3)
        check_gather(dev, dtype, 1, 2, 70, 61, 1, seed=4)
        for stride in (1, 2):
            check_writeback(dev, dtype, 2, 5, 7, 9, 2, stride, beta=True, seed=5)
            check_writeback(dev, dtype, 2, 6, 8, 8, 3, stride, beta=False, seed=6)
        check_mixed(dev, dtype, 2, 3, 7, 5, 1, 4, True, True, seed=7)
        check_mixed(dev, dtype, 2, 3, 8, 10, 2, 5, False, False, seed=8)
        d = dev.with_offset(True)
        check_gather(d, dtype, 2, 5, 4, 4, 3, seed=9)
        check_writeback(d, dtype, 2, 6, 8, 8, 3, 2, beta=True, seed=10)
        check_mixed(d, dtype, 2, 3, 8, 10, 2, 1, False, True, seed=11)


def run_sanitized(emu_dir, sanitize, env_extra, cases=("sanitized_cases",)):
    lib = H.build(emu_dir, sanitize=sanitize)
    preload = H.runtime_library(sanitize)
    if preload is None:
        pytest.skip(f"no {sanitize} sanitizer runtime for g++ here")
    calls = "; ".join(f"T.{c}(H.Emulated(sys.argv[2]))" for c in cases)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_cuda_emulated as T, emu_harness as H; "
            f"{calls}; print('sanitized cases passed')")
    env = dict(os.environ, LD_PRELOAD=preload, **env_extra)
    r = subprocess.run([sys.executable, "-c", code, str(HERE), str(lib)], env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "sanitized cases passed" in r.stdout, out[-6000:]
    for bad in ("runtime error:", "ERROR: AddressSanitizer", "WARNING: ThreadSanitizer"):
        assert bad not in out, out[-6000:]


def test_address_and_undefined_sanitizers(emu_dir):
    """The kernels under AddressSanitizer + UBSan (out-of-bounds accesses of the exact-size
    buffers, misaligned or overflowing arithmetic): a build of its own, in a subprocess."""
    run_sanitized(emu_dir, "address", {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
                                       "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"})


@pytest.mark.skipif(os.environ.get("ADARTS_EMU_TSAN") != "1", reason="ThreadSanitizer run: ADARTS_EMU_TSAN=1")
def test_thread_sanitizer(emu_dir):
    """The kernels with the CUDA threads running concurrently under ThreadSanitizer (opt-in:
    slow, and it reports races between CUDA threads as well as in the emulator): the
    sanitizer cases and the block-mode shapes of the schedules (schedule_cases)."""
    run_sanitized(emu_dir, "thread", {"ADARTS_EMU_SCHED": "free", "TSAN_OPTIONS": "halt_on_error=1"},
                  cases=("sanitized_cases", "schedule_cases"))


def test_cuda_device_class_on_cpu_kernels():
    """The ``cuda`` device's calls (argument order, optional arguments, results) checked where
    no GPU is: the same class on the C++ CPU kernels, a few cases per op."""
    from adarts_kernels import _ext
    if not _ext.HAS_EXT:
        pytest.skip(f"extension not built: {_ext.EXT_ERROR}")
    dev = H.Cuda(device="cpu")
    for d in (dev, dev.with_offset(True)):
        check_score(d, torch.float32, 2, 8, 4, 4, 3, seed=1)
        check_gather(d, torch.float32, 2, 5, 4, 4, 3, seed=2)
        check_writeback(d, torch.float32, 2, 5, 6, 10, 2, 2, beta=True, seed=3)
        check_writeback(d, torch.float32, 2, 6, 8, 8, 3, 1, beta=False, seed=4)
        check_mixed(d, torch.float32, 2, 3, 7, 5, 1, 4, True, True, seed=5)
        check_mixed(d, torch.float32, 2, 3, 8, 10, 2, 1, False, False, seed=6)
