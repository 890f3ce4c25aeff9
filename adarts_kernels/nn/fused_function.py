"""The fused ADARTS edge as one autograd node: the eager path of ``FusedAttentionMixedOp``.

On a GPU a search step at CIFAR batch sizes spends microseconds per kernel, so an edge's
cost is set by the host: Python, dispatch and autograd bookkeeping. Composed of the four
``adarts::`` ops (each a ``torch.library`` custom op with its own autograd wrapper) and three
``autograd.Function`` units, one edge forward + backward made 15 autograd nodes and eight
custom-op calls, each with its argument handling. :class:`FusedEdgeFunction` computes the
same edge in one node:

- forward: ``attention_score`` -> selection -> ``attention_gather`` -> the shared-ReLU
  convolution chains and the sep_convs' second halves -> ``mixed_sum`` -> the running
  statistics of all the edge's BatchNorms in one batched update -> ``attention_writeback``;
- backward: the same kernels' backwards in reverse.

It calls the ops' registered kernels directly (``adarts_kernels.ops.*.*_kernel``) and the
units' functional cores (``adarts_kernels.nn.units``), in the order autograd runs them in
the composed edge, so the arithmetic is the same and the edge's outputs and gradients are
bitwise those of the composed path (tested). Arguments are not re-checked per op: the edge
builds them itself from inputs it has checked (``check_edge_input``); indices that did not
come from the edge's own selection are still validated, as in the composed path.

Saved for backward: exactly what the composed edge saves (``x``, ``a``, ``idx``, ``x_sel``,
the BN inputs, the sep_conv halves' inputs and statistics, ``y``, the edge and candidate
weights), or with ``recompute=True`` only the edge's inputs and ``idx``: the edge is then
re-run inside backward (without autograd: its intermediates are kept for the backward that
follows at once) and no BatchNorm statistics move a second time.

The composed path stays the definition: ``torch.compile`` traces it (the custom ops have
fakes and compile without graph breaks), as do fake-tensor, proxy and functional modes and
functorch transforms; :func:`eager_path_ok` decides.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..ops.attention_gather import gather_bwd_kernel, gather_fwd_kernel
from ..ops.attention_score import score_bwd_kernel, score_fwd_kernel
from ..ops.attention_writeback import writeback_bwd_kernel, writeback_fwd_kernel
from ..ops.mixed_sum import mixed_sum_bwd_kernel, mixed_sum_fwd_kernel
from ..ops.reference import acc_dtype
from .batchnorm import batchnorm_mode, update_running_stats_rows
from .operations import SepConv
from . import units
from .recompute import selected_only
from .units import _as, relu_convs_bwd, relu_convs_fwd, seps_bwd, seps_fwd

Tensor = torch.Tensor
_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL"))


def eager_path_ok(x: Tensor) -> bool:
    """Whether the one-node eager path may run for edge input ``x``: eager (not traced by
    ``torch.compile``), a plain CPU or CUDA tensor, no fake/proxy/functional dispatch mode
    and no functorch transform. Otherwise the edge runs the composed ``adarts::`` ops."""
    if torch.compiler.is_compiling() or not isinstance(x, Tensor) or type(x) not in (Tensor, nn.Parameter):
        return False
    if x.device.type not in ("cpu", "cuda") or torch._C._are_functorch_transforms_active():
        return False
    return all(torch._C._get_dispatch_mode(k) is None for k in _MODES)


class _Sep(NamedTuple):
    at: int                 # the chain (BN input) whose first half it continues
    bn1: nn.BatchNorm2d
    dw2: nn.Conv2d
    pw2: nn.Conv2d


class EdgePlan:
    """What the edge function reads of a ``FusedAttentionMixedOp``, gathered once: the chain
    specs, the modules holding the weights (in the order the function takes them), the
    sep_convs' second halves, the BNs and the candidate columns."""

    def __init__(self, edge):
        roles = edge.roles
        self.roles = roles
        self.specs = roles.specs()
        self.stride, self.n, self.eps = edge.stride, edge.C // edge.k, roles.eps
        first = roles.first_modules()
        self.seps: List[_Sep] = []
        for i, b in enumerate(roles.bn_inputs):
            if isinstance(b.module, SepConv):
                L = b.module.layers()
                self.seps.append(_Sep(i, L.bn1, L.dw2, L.pw2))
        self.weight_modules: List[nn.Module] = [edge.attention.mlp[0], edge.attention.mlp[2]] + first + [
            mod for s in self.seps for mod in (s.dw2, s.pw2)]
        self.n_first = len(first)
        #: every BN whose running statistics the edge moves: the mixed sum's rows, then the sep_convs' first BNs
        self.stat_bns: List[nn.BatchNorm2d] = list(roles.bns) + [s.bn1 for s in self.seps]
        # the encodings of adarts_C::edge_fwd / edge_bwd (csrc/edge.cpp)
        kinds = {"conv": 0, "fr": 1, "dwpw": 2}
        self.spec_ints = [v for sp in self.specs for v in (kinds[sp[0]],) + _pad4(sp[1:])]
        self.sep_ints = [v for sp in self.seps for v in (sp.at, sp.dw2.stride[0], sp.dw2.padding[0], sp.dw2.dilation[0])]
        self.sep_eps = [float(sp.bn1.eps) for sp in self.seps]
        self.col_ints = [len(roles.z_columns), *roles.z_columns, *roles.pool_columns,
                         -1 if roles.identity_column is None else roles.identity_column]
        self.dwpw = [sp[0] == "dwpw" for sp in self.specs]

    def batch_stats(self) -> bool:
        """Whether every BN the edge folds normalises with batch statistics (training mode)."""
        return batchnorm_mode(self.roles.bns[0])[0] and all(batchnorm_mode(s.bn1)[0] for s in self.seps)

    def running(self, dtype: torch.dtype):
        """``(buffers, momentum)`` for ``adarts_C::edge_fwd`` to move every BN's running statistics
        itself: the running means, the running variances, the ``num_batches_tracked`` of
        :attr:`stat_bns`. ``None`` where it cannot (a BN in eval mode or tracking none, another
        dtype than the statistics', a cumulative or a differing momentum): then the caller does."""
        rms, rvs, nbts = [], [], []
        momentum = None
        for bn in self.stat_bns:
            buf = bn._buffers
            rm = buf.get("running_mean")
            if (not bn.training or not bn.track_running_stats or rm is None or rm.dtype != dtype
                    or bn.momentum is None or (momentum is not None and bn.momentum != momentum)):
                return None
            momentum = bn.momentum
            rms.append(rm)
            rvs.append(buf["running_var"])
            nbts.append(buf["num_batches_tracked"])
        return rms + rvs + nbts, float(momentum)

    def params(self) -> List[Tensor]:
        return [m._parameters["weight"] for m in self.weight_modules]   # m.weight, without Module.__getattr__


def _pad4(rest: tuple) -> tuple:
    """A spec's (stride, padding, dilation): ``("fr",)`` has none, ``("conv", s, p)`` no dilation."""
    return tuple(rest) + (1,) * (3 - len(rest)) if rest else (2, 0, 1)


#: run the fused edge's host sequence in C++ (adarts_C::edge_fwd / edge_bwd) where it can;
#: ``False`` keeps the Python sequence (same kernels, same order: bitwise the same results)
USE_CXX = True
#: and the autograd node too (adarts_C::edge, csrc/edge_node.cpp) where it covers the call
#: (:func:`apply_edge`); ``False`` keeps :class:`FusedEdgeFunction` (bitwise the same results)
USE_CXX_NODE = True
_HAS_CXX: Optional[bool] = None
_HAS_NODE: Optional[bool] = None


def cxx_available() -> bool:
    """Whether the compiled library has the edge operators (an older build has not)."""
    global _HAS_CXX
    from .. import _ext
    if not _ext.HAS_EXT:
        return False
    if _HAS_CXX is None:     # asked once the library is loaded
        _HAS_CXX = hasattr(torch.ops.adarts_C, "edge_fwd")
    return _HAS_CXX


def node_available() -> bool:
    """Whether the compiled library has the edge's autograd node (``adarts_C::edge``)."""
    global _HAS_NODE
    if not cxx_available():
        return False
    if _HAS_NODE is None:
        _HAS_NODE = hasattr(torch.ops.adarts_C, "edge")
    return _HAS_NODE


def apply_edge(run: "Run", x: Tensor, weights: Tensor, ew: Optional[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The edge output with its autograd node: ``adarts_C::edge`` (the node in C++) for the
    common case, the built-in top-k of a compiled backend with every BatchNorm on batch
    statistics and one momentum; :class:`FusedEdgeFunction` otherwise. Bitwise the same."""
    plan = run.plan
    if (USE_CXX_NODE and USE_CXX and run.idx is None and not run.keep and run.impl in ("cpp", "cuda")
            and run.edge.selector is None and node_available()):
        given = plan.running(acc_dtype(x.dtype))
        if given is not None:       # every BN training and tracking: batch statistics throughout
            out, idx = torch.ops.adarts_C.edge(
                x, weights, ew, params, given[0], plan.n, plan.spec_ints, plan.sep_ints, plan.col_ints, plan.stride,
                plan.eps, plan.sep_eps, given[1], units._channels_last_pays(x), units._flip_pays(x),
                units._merge_pays(x, plan.n), run.recompute)
            run.edge.last_idx = idx
            return out
    return FusedEdgeFunction.apply(run, x, weights, ew, *params)


class Run(NamedTuple):
    """One call's settings: the edge, its plan, the backend, the given ``idx`` (or ``None``),
    whether given/selected indices are validated, and the mode."""
    edge: nn.Module
    plan: EdgePlan
    impl: str
    idx: Optional[Tensor]
    trusted: bool       # a trusted selector's indices (a sort's prefix): not validated
    keep: bool          # replay: keep the intermediates, move no statistics
    recompute: bool     # save the inputs only; re-run inside backward


class _State(NamedTuple):
    a: Tensor
    idx: Tensor
    xs: Tensor
    zs: List[Tensor]
    r: Optional[Tensor]
    ts: List[Optional[Tensor]]
    sep: List[tuple]        # per sep_conv: (u, mean, rstd, kept, conf: units.sep_settings)
    y: Tensor
    mean: Tensor
    var: Tensor
    training: bool
    ew: Optional[Tensor]
    cxx: bool = False       # made by adarts_C::edge_fwd: backward runs adarts_C::edge_bwd


def edge_forward(run: Run, x: Tensor, weights: Tensor, ew: Optional[Tensor], params: Sequence[Tensor],
                 *, given_idx: Optional[Tensor] = None, replay: bool = False) -> Tuple[Tensor, _State]:
    """The edge's forward without autograd: ``(out, state)``; ``state`` holds what backward reads.
    ``replay``: a re-run of a forward already made (its ``given_idx``) inside backward:
    intermediates kept, no statistics moved, no index validation, and no output (``None``)."""
    plan, impl, edge = run.plan, run.impl, run.edge
    roles, n, stride = plan.roles, plan.n, plan.stride
    dt = x.dtype
    cxx = USE_CXX and impl in ("cpp", "cuda") and plan.batch_stats() and cxx_available()
    if cxx and replay:          # the re-run inside backward: attention and the rest in one call
        return _cxx_forward(run, x, None, given_idx, weights, ew, params, True, True)
    if cxx and run.idx is None and edge.selector is None:
        # the built-in top-k: attention, selection and the rest in one call
        return _cxx_forward(run, x, None, None, weights, ew, params, run.keep, False)
    w1, w2 = params[0].to(dt).flatten(1), params[1].to(dt).flatten(1)
    a, own_idx = score_fwd_kernel(x, w1, w2, n, impl)
    if replay:
        idx, check = given_idx, False
    else:
        idx = edge._choose(a, n, run.idx, lambda: own_idx)
        # as the composed path: attention_score's idx is distinct and in range by construction,
        # a replay's was checked in the forward it replays, a trusted selector's is a sort's prefix
        check = idx is not own_idx and not run.keep and not (run.idx is None and run.trusted)
    keep = replay or run.keep
    if cxx and not check:
        return _cxx_forward(run, x, a, idx, weights, ew, params, keep, replay)
    xs = gather_fwd_kernel(x, a, idx, impl, check)
    zs, r, ts = relu_convs_fwd(xs, plan.specs, params[2:2 + plan.n_first], keep)
    B, _, H, W = xs.shape
    count = B * (H // stride) * (W // stride)
    update = not keep
    rows_m: List[Tensor] = []
    rows_v: List[Tensor] = []
    sep_state = []
    if plan.seps:
        S, at = len(plan.seps), 2 + plan.n_first
        confs, rms, rvs = units.sep_settings(plan.seps)
        us = [zs[s.at] for s in plan.seps]
        res = seps_fwd(us, params[at:at + 2 * S:2], params[at + 1:at + 2 * S:2], confs, rms, rvs, keep,
                       units._merge_pays(xs, n))
        for s, u, conf, (z, m1, v1, rstd1, kept) in zip(plan.seps, us, confs, res):
            zs[s.at] = z
            sep_state.append((u, m1, rstd1, kept, conf))
            rows_m.append(m1)
            rows_v.append(v1)
    # the mixed sum reads NCHW: convert the BN inputs once here, and keep those (the kernels'
    # own contiguous() would copy channels_last ones again in backward)
    zs = [z.contiguous() for z in zs]
    z_w, pool_w, id_w = roles.split(weights.to(dt))
    training = batchnorm_mode(roles.bns[0])[0]
    if training:
        y, mean, var = mixed_sum_fwd_kernel(zs, xs, z_w, pool_w, id_w, stride, roles.eps, None, None, impl)
    else:
        rm = torch.stack([bn.running_mean for bn in roles.bns])
        rv = torch.stack([bn.running_var for bn in roles.bns])
        y, mean, var = mixed_sum_fwd_kernel(zs, xs, z_w, pool_w, id_w, stride, roles.eps, rm, rv, impl)
    if update:   # every BN of the edge in one batched update (no-op for BNs in eval mode)
        update_running_stats_rows(plan.stat_bns, list(mean.unbind(0)) + rows_m, list(var.unbind(0)) + rows_v,
                                  count)
    ewd = None if ew is None else ew.to(dt)
    st = _State(a, idx, xs, zs, r, ts, sep_state, y, mean, var, training, ewd)
    if replay:      # the re-run inside backward needs the state, not the output
        return None, st
    return writeback_fwd_kernel(x, a, idx, y, ewd, stride, impl, check), st


def _cxx_forward(run: Run, x, a, idx, weights, ew, params, keep: bool, replay: bool):
    """:func:`edge_forward` after the selection, in one call of ``adarts_C::edge_fwd``."""
    plan = run.plan
    dt = x.dtype
    given = None if keep else plan.running(acc_dtype(dt))
    running, momentum = ([], 0.0) if given is None else given
    res = torch.ops.adarts_C.edge_fwd(x, a, idx, plan.n, list(params), _as(weights, dt), ew, plan.spec_ints,
                                      plan.sep_ints, plan.col_ints, plan.stride, plan.eps, plan.sep_eps, keep, replay,
                                      units._channels_last_pays(x), running, momentum, units._merge_pays(x, plan.n))
    if a is None:       # it computed the attention: a and idx come last
        a, idx = res[-2], res[-1]
        if not replay:
            run.edge.last_idx = idx
    xs, y, mean, var = res[1:5]
    P = len(plan.specs)
    zs = list(res[5:5 + P])
    at = 5 + P
    per = 6 if keep else 4
    sep, rows_m, rows_v = [], [], []
    for s in plan.seps:
        u, m1, v1, rstd1 = res[at:at + 4]
        kept = tuple(res[at + 4:at + 6]) if keep else ()
        sep.append((u, m1, rstd1, kept, (s.dw2.stride[0], s.dw2.padding[0], s.dw2.dilation[0], True, s.bn1.eps)))
        rows_m.append(m1)
        rows_v.append(v1)
        at += per
    r, ts = None, []
    if keep:
        r = res[at]
        ts = [t if d else None for t, d in zip(res[at + 1:at + 1 + P], plan.dwpw)]
    elif given is None:         # the statistics the kernel did not move
        B, _, H, W = xs.shape
        count = B * (H // plan.stride) * (W // plan.stride)
        update_running_stats_rows(plan.stat_bns, list(mean.unbind(0)) + rows_m, list(var.unbind(0)) + rows_v,
                                  count)
    ewd = None if ew is None else ew.to(dt)
    st = _State(a, idx, xs, zs, r, ts, sep, y, mean, var, True, ewd, True)
    return (None if replay else res[0]), st


def _cxx_backward(run: Run, grad, x, weights, ew, params, st: _State):
    plan = run.plan
    sep_state = [t for (u, m1, rstd1, kept, _) in st.sep for t in (u, m1, rstd1, *kept)]
    kept = []
    if st.r is not None:    # a replay's intermediates; the kernel skips the placeholders of non-depthwise chains
        empty = x.new_empty(0)
        kept = [st.r] + [empty if t is None else t for t in st.ts]
    dx, dw, dbeta, *dparams = torch.ops.adarts_C.edge_bwd(
        grad, x, st.a, st.idx, st.xs, st.y, st.mean, st.var, ew, _as(weights, x.dtype), list(params), list(st.zs),
        sep_state, kept, plan.spec_ints, plan.sep_ints, plan.col_ints, plan.stride, plan.eps,
        units._channels_last_pays(x), units._flip_pays(x), units._merge_pays(x, plan.n))
    return (dx, _as(dw, weights.dtype), None if ew is None else dbeta, *dparams)


def edge_backward(run: Run, grad: Tensor, x: Tensor, weights: Tensor, ew: Optional[Tensor],
                  params: Sequence[Tensor], st: _State):
    """Gradients ``(dx, dweights, dew, *dparams)`` from the forward's ``state``."""
    if st.cxx:
        return _cxx_backward(run, grad, x, weights, ew, params, st)
    plan, impl = run.plan, run.impl
    roles, stride = plan.roles, plan.stride
    dt = x.dtype
    dx_wb, da_wb, dy, dbeta = writeback_bwd_kernel(grad.contiguous(), x, st.a, st.idx, st.y, st.ew, stride, impl)
    z_w, pool_w, id_w = roles.split(weights.to(dt))
    dz, dxs_ms, dzw, dpw, diw = mixed_sum_bwd_kernel(dy.contiguous(), st.zs, st.xs, z_w, pool_w, id_w, st.mean,
                                                     st.var, stride, roles.eps, st.training, impl)
    gzs: List[Optional[Tensor]] = list(dz)
    dsep: List[Tensor] = []
    if plan.seps:
        S, at = len(plan.seps), 2 + plan.n_first
        res = seps_bwd([gzs[s.at] for s in plan.seps], [e[0] for e in st.sep], params[at:at + 2 * S:2],
                       params[at + 1:at + 2 * S:2], [e[1] for e in st.sep], [e[2] for e in st.sep],
                       [e[4] for e in st.sep], [e[3] for e in st.sep], units._merge_pays(st.xs, plan.n))
        for s, (du, dwd, dwp) in zip(plan.seps, res):
            gzs[s.at] = du
            dsep += [dwd, dwp]
    dxs_relu, dfirst = relu_convs_bwd(gzs, st.xs, plan.specs, params[2:2 + plan.n_first], st.r, st.ts)
    dxs = dxs_ms + dxs_relu
    dx_g, da_g = gather_bwd_kernel(dxs.contiguous(), x, st.a, st.idx, impl)
    da = da_wb + da_g
    w1, w2 = params[0].to(dt).flatten(1), params[1].to(dt).flatten(1)
    dx_s, dw1, dw2 = score_bwd_kernel(da.contiguous(), x, w1, w2, st.a, impl)
    dx = dx_wb + dx_g + dx_s
    dw = torch.zeros(weights.shape, dtype=dzw.dtype, device=dzw.device)
    _put(dw, roles.z_columns, dzw)
    _put(dw, roles.pool_columns, dpw)
    if roles.identity_column is not None:
        dw[roles.identity_column] = diw
    dew = None if ew is None else dbeta.to(ew.dtype)
    dparams = [dw1.reshape(params[0].shape).to(params[0].dtype), dw2.reshape(params[1].shape).to(params[1].dtype),
               *dfirst, *dsep]
    return dx, dw.to(weights.dtype), dew, *dparams


def _put(dst: Tensor, cols: Sequence[int], src: Tensor) -> None:
    if not cols:
        return
    if all(b == a + 1 for a, b in zip(cols, cols[1:])):
        dst[cols[0]:cols[0] + len(cols)] = src
    else:
        dst[list(cols)] = src


class FusedEdgeFunction(torch.autograd.Function):
    """``FusedEdgeFunction.apply(run, x, weights, edge_weight, *params)``: the edge output
    ``(B, C, H/s, W/s)`` as one autograd node (see the module docstring). ``params``: the
    plan's weights (:meth:`EdgePlan.params`), whose gradients it returns. Backward is
    first-order only (a gradient of the gradient raises)."""

    @staticmethod
    def forward(ctx, run: Run, x: Tensor, weights: Tensor, ew: Optional[Tensor], *params: Tensor):
        out, st = edge_forward(run, x, weights, ew, params)
        ctx.run = run
        if run.recompute:
            dev = x.device.type
            ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev), dev)
            ctx.save_for_backward(x, weights, ew, selected_only(st.idx), *params)
            return out
        ctx.n_zs, ctx.n_sep, ctx.has_r = len(st.zs), len(st.sep), st.r is not None
        ctx.training, ctx.cxx = st.training, st.cxx
        sep_flat = [t for (u, m1, rstd1, kept, _) in st.sep for t in (u, m1, rstd1, *kept)]
        ctx.sep_conf = [(len(kept), conf) for (_, _, _, kept, conf) in st.sep]
        ts = st.ts if st.r is not None else []
        ctx.n_ts = len(ts)
        ctx.save_for_backward(x, weights, ew, st.a, st.idx, st.xs, st.y, st.mean, st.var, st.ew,
                              *params, *st.zs, *sep_flat, *(([st.r] + list(ts)) if st.r is not None else []))
        ctx.n_params = len(params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        run = ctx.run
        if run.recompute:
            x, weights, ew, idx, *params = ctx.saved_tensors
            enabled, dtype, dev = ctx.autocast
            if enabled:
                with torch.autocast(dev, dtype=dtype):
                    grads = _rerun_and_backward(run, grad, x, weights, ew, params, idx)
            else:
                grads = _rerun_and_backward(run, grad, x, weights, ew, params, idx)
            return (None, *grads)
        saved = list(ctx.saved_tensors)
        x, weights, ew, a, idx, xs, y, mean, var, ewd = saved[:10]
        at = 10
        params = saved[at:at + ctx.n_params]
        at += ctx.n_params
        zs = saved[at:at + ctx.n_zs]
        at += ctx.n_zs
        sep = []
        for n_kept, conf in ctx.sep_conf:
            u, m1, rstd1 = saved[at:at + 3]
            kept = tuple(saved[at + 3:at + 3 + n_kept])
            sep.append((u, m1, rstd1, kept, conf))
            at += 3 + n_kept
        r, ts = (saved[at], list(saved[at + 1:])) if ctx.has_r else (None, [None] * len(zs))
        st = _State(a, idx, xs, list(zs), r, ts, sep, y, mean, var, ctx.training, ewd, ctx.cxx)
        return (None, *edge_backward(run, grad, x, weights, ew, params, st))


def _rerun_and_backward(run: Run, grad, x, weights, ew, params, idx):
    _, st = edge_forward(run, x, weights, ew, params, given_idx=idx, replay=True)
    return edge_backward(run, grad, x, weights, ew, params, st)
