"""``validate_idx`` of ``attention_gather`` and ``attention_writeback``.

By default a user's ``idx`` is checked (values distinct and in ``[0, C)``) on every backend;
with ``validate_idx=False`` (an ``idx`` that ``attention_score`` has just produced) the value
check ``check_idx_values`` is skipped, the results (forward and backward) are those of the
default call, and the op still passes ``opcheck`` and ``torch.compile(fullgraph=True)``.
"""
import importlib

import pytest
import torch
from helpers import assert_close, attention_values, backend_params, device_of, gen, noncontig, rand_idx, randn

from adarts_kernels.ops import attention_gather, attention_score, attention_writeback
from adarts_kernels.ops.attention_gather import _attention_gather
from adarts_kernels.ops.attention_writeback import _attention_writeback

OP_MODULES = {name: importlib.import_module(f"adarts_kernels.ops.{name}")
              for name in ("attention_gather", "attention_writeback")}
CPU_BACKENDS = ("reference", "cpp", "triton")


def _inputs(impl, B=2, C=7, H=5, W=6, n=3, stride=1, dtype=torch.float32, seed=0):
    """Odd shapes, non-contiguous x, a and y, a random (unsorted) idx, beta != 1."""
    dev = device_of(impl)
    g = gen(seed)
    x = noncontig(randn((B, C, H, W), g, dtype, dev))
    a = noncontig(attention_values(B, C, g, dtype, dev))
    idx = rand_idx(C, n, g, dev)
    y = noncontig(randn((B, n, H // stride, W // stride), g, dtype, dev))
    beta = randn((), g, dtype, dev, scale=0.5) + 1.0
    return x, a, idx, y, beta


def _call(op, x, a, idx, y, beta, stride, impl, **kw):
    if op == "attention_gather":
        return attention_gather(x, a, idx, impl=impl, **kw)
    return attention_writeback(x, a, idx, y, beta, stride, impl=impl, **kw)


def _forward_backward(op, x, a, idx, y, beta, stride, impl, **kw):
    """The output and the gradients of every differentiable input for a fixed random grad."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, y, beta)]
    out = _call(op, leaves[0], leaves[1], idx, leaves[2], leaves[3], stride, impl, **kw)
    grad = noncontig(randn(tuple(out.shape), gen(99), out.dtype, out.device))
    out.backward(grad)
    used = leaves[:2] if op == "attention_gather" else leaves
    return [out.detach()] + [t.grad for t in used]


def _boom(*args, **kwargs):
    raise AssertionError("check_idx_values was called")


@pytest.mark.parametrize("op", sorted(OP_MODULES))
@pytest.mark.parametrize("bad", [[1, 7, 0], [2, -1, 0], [4, 1, 4]], ids=["above_C", "negative", "repeated"])
@pytest.mark.parametrize("impl", backend_params(CPU_BACKENDS))
def test_bad_idx_raises_by_default(impl, bad, op):
    if device_of(impl) != "cpu":
        pytest.skip("on CUDA the check is an asynchronous device assert, not an exception")
    x, a, _, y, beta = _inputs(impl)
    idx = torch.tensor(bad, dtype=torch.int64)
    # ValueError from the Python check, RuntimeError from the C++ kernel's own check
    with pytest.raises((ValueError, RuntimeError), match=rf"adarts {op}: idx"):
        _call(op, x, a, idx, y, beta, 1, impl)


@pytest.mark.parametrize("op, stride", [("attention_gather", 1), ("attention_writeback", 1),
                                        ("attention_writeback", 2)])
@pytest.mark.parametrize("impl", backend_params())
def test_trusted_idx_skips_the_value_check(impl, op, stride, monkeypatch):
    x, a, idx, y, beta = _inputs(impl, H=6, W=4, stride=stride, dtype=torch.float64, seed=stride)
    expected = _forward_backward(op, x, a, idx, y, beta, stride, impl)

    monkeypatch.setattr(OP_MODULES[op], "check_idx_values", _boom)
    got = _forward_backward(op, x, a, idx, y, beta, stride, impl, validate_idx=False)
    assert len(got) == len(expected)
    for i, (o, e) in enumerate(zip(got, expected)):
        assert_close(o, e, torch.float64, f"{op}[{i}]")
        assert torch.equal(o, e), f"{op}[{i}]: validate_idx=False changed the result"
    if impl != "cpp":   # the C++ CPU kernel checks the values itself: the Python check is never called there
        with pytest.raises(AssertionError, match="check_idx_values was called"):
            _call(op, x, a, idx, y, beta, stride, impl)


@pytest.mark.parametrize("impl", backend_params(("reference", "cpp")))
def test_opcheck_with_trusted_idx(impl):
    x, a, idx, y, beta = _inputs(impl, C=8, H=4, W=4, n=2, seed=3)
    y2 = randn((2, 2, 2, 2), gen(4), x.dtype, x.device)
    for t in (x, a, y, y2, beta):
        t.requires_grad_()
    for op, args in ((_attention_gather, (x, a, idx, impl, False)),
                     (_attention_writeback, (x, a, idx, y, beta, 1, impl, False)),
                     (_attention_writeback, (x, a, idx, y2, None, 2, impl, False))):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_with_trusted_idx(monkeypatch):
    """The fused edge as the fused module runs it: idx from attention_score, trusted downstream."""
    g = gen(5)
    x, w1, w2 = randn((2, 8, 4, 4), g), randn((4, 8), g, scale=0.5), randn((8, 4), g, scale=0.5)
    beta = randn((), g) + 1.0

    def edge(x, w1, w2, beta, validate_idx):
        a, idx = attention_score(x, w1, w2, 3, impl="reference")
        xs = attention_gather(x, a, idx, impl="reference", validate_idx=validate_idx)
        return attention_writeback(x, a, idx, xs * 2.0, beta, 1, impl="reference", validate_idx=validate_idx)

    ref_ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    ref = edge(*ref_ins, True)
    ref.backward(torch.ones_like(ref))

    for module in OP_MODULES.values():
        monkeypatch.setattr(module, "check_idx_values", _boom)
    compiled = torch.compile(lambda *ts: edge(*ts, False), fullgraph=True, backend="aot_eager")
    ins = [t.clone().requires_grad_() for t in (x, w1, w2, beta)]
    out = compiled(*ins)
    out.backward(torch.ones_like(out))
    assert_close(out, ref, torch.float32, "out")
    for i, (p, q) in enumerate(zip(ins, ref_ins)):
        assert_close(p.grad, q.grad, torch.float32, f"grad[{i}]")
