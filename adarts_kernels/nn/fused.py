"""``FusedAttentionMixedOp``: the ADARTS edge on the fused ``adarts::`` ops.

A drop-in for :class:`~adarts_kernels.nn.AttentionMixedOp`: same constructor, same
``forward(x, weights, edge_weight=None)``, same ``state_dict`` keys (checkpoints move both
ways), same function. Inside:

- ``adarts::attention_score`` for the channel attention and the top-k selection;
- ``adarts::attention_gather`` for ``x_sel = (x * a)[:, idx]`` (``x * a`` is never formed);
- the convolution candidates on ``x_sel`` with one ReLU shared by all four (and by the
  FactorizedReduce of ``skip_connect`` at stride 2), keeping only ``x_sel`` and recomputing
  ReLU and depthwise outputs in backward (``nn/units.py``); the first BN of each
  ``sep_conv`` is folded into its second half the same way;
- ``adarts::mixed_sum`` for the weighted sum with every candidate's trailing affine-free
  BatchNorm folded in (pooling recomputed in backward, ``none`` skipped);
- ``adarts::attention_writeback`` for the write-back fused with edge normalisation (the
  edge output is not kept for backward; at stride 2 no pooling indices are stored).

Saved for backward per edge, in units of ``|x_sel| = |x| / k``: ``x_sel`` (1), the BN inputs
(2 inside the sep_convs + 4 final, + 1/4 for the FactorizedReduce at stride 2), the mixed
output ``y`` (1), and ``a: (B, C)``; the edge input ``x`` is the node state, shared with the
other edges. BatchNorm running statistics are updated exactly as ``BatchNorm2d`` does.

The candidates are reached by role through :class:`FusedCandidates`, built once in
``__init__`` from the candidates' module types (never by position): the fused ops know
nothing of the search space, and a candidate the fused edge cannot run (a new kind, a
missing pool, a pool of another size) fails at construction with its name.
"""
from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _ext, backend
from ..ops import attention_gather, attention_score, attention_writeback, mixed_sum
from ..limits import MAX_Z
from .batchnorm import batch_norm_keep_output, batchnorm_mode, update_running_stats
from .edges import Candidates, ChannelAttention, check_edge_input, check_k
from .operations import PRIMITIVES, DilConv, FactorizedReduce, Identity, PoolBN, ReLUConvBN, SepConv, Zero
from .fused_function import EdgePlan, Run, apply_edge, eager_path_ok, edge_forward
from .recompute import ReplayableEdge, checkpoint_edge
from .selection import ChannelSelectingEdge, ChannelSelector
from . import units
from .units import BnReluDwPwSeps, SharedReluConvs, Spec, dwpw_spec


class _BnInput(NamedTuple):
    """A candidate that ends in an affine-free BN whose input the mixed sum takes (``z``)."""
    name: str
    column: int
    module: nn.Module     # FactorizedReduce, SepConv or DilConv
    spec: Spec            # its chain after the shared ReLU (units.SharedReluConvs)


def _columns(weights: torch.Tensor, cols: Sequence[int]) -> torch.Tensor:
    """``weights[cols]``: a view when the columns are consecutive (no kernel launch), else a stack."""
    if all(b == a + 1 for a, b in zip(cols, cols[1:])):
        return weights[cols[0]:cols[0] + len(cols)]
    return torch.stack([weights[c] for c in cols])


class FusedCandidates:
    """The candidates of a fused edge by role, read once from their modules.

    ``none`` (:class:`Zero`) is skipped; the ``max``/``avg`` 3x3 pools (:class:`PoolBN`) are
    the mixed sum's pooling inputs; ``skip_connect`` is the identity weight at stride 1
    (:class:`Identity`) or a BN input at stride 2 (:class:`FactorizedReduce`); every
    :class:`SepConv` and :class:`DilConv` is a BN input. Each role keeps its column of
    ``weights`` (the candidate's position in ``primitives``). A plain object, not a module:
    ``state_dict`` keys stay those of the candidates.
    """

    def __init__(self, cands: Candidates, stride: int, owner: str = "FusedAttentionMixedOp"):
        pools: dict = {}
        self.identity_column: Optional[int] = None
        self.bn_inputs: List[_BnInput] = []
        for col, (name, op) in enumerate(zip(cands.primitives, cands._ops)):
            where = f"{owner}: candidate {name!r} (column {col})"
            if isinstance(op, Zero):
                continue
            if isinstance(op, PoolBN):
                kind = "max" if isinstance(op.pool, nn.MaxPool2d) else "avg" if isinstance(op.pool, nn.AvgPool2d) else None
                if kind is None:
                    raise ValueError(f"{where}: the fused mixed sum has no {type(op.pool).__name__}")
                if kind in pools:
                    raise ValueError(f"{where}: a second {kind} pool (the first is {pools[kind][0]!r}); "
                                     "the fused mixed sum takes one max and one avg pool")
                _check_pool(where, op.pool, stride)
                pools[kind] = (name, col, op.bn)
            elif isinstance(op, Identity):
                self.identity_column = col
            elif isinstance(op, FactorizedReduce):
                self.bn_inputs.append(_BnInput(name, col, op, ("fr",)))
            elif isinstance(op, SepConv):
                self.bn_inputs.append(_BnInput(name, col, op, dwpw_spec(op.layers().dw1)))
            elif isinstance(op, DilConv):
                self.bn_inputs.append(_BnInput(name, col, op, dwpw_spec(op.layers().dw)))
            else:
                raise ValueError(f"{where}: {type(op).__name__} has no fused implementation "
                                 "(use AttentionMixedOp, the plain-PyTorch edge, for this search space)")
        missing = [k for k in ("max", "avg") if k not in pools]
        if missing:
            raise ValueError(f"{owner}: the fused mixed sum needs a max_pool_3x3 and an avg_pool_3x3 candidate; "
                             f"no {' and no '.join(missing)} pool among {list(cands.primitives)}")
        if len(self.bn_inputs) > MAX_Z:
            raise ValueError(f"{owner}: {len(self.bn_inputs)} convolution candidates "
                             f"({[b.name for b in self.bn_inputs]}); the fused mixed sum takes at most {MAX_Z}")
        self.pool_columns = (pools["max"][1], pools["avg"][1])
        self.z_columns = tuple(b.column for b in self.bn_inputs)
        #: the BNs folded into the mixed sum, in its statistics' row order: max pool, avg pool, z...
        self.bns: List[nn.BatchNorm2d] = [pools["max"][2], pools["avg"][2]] + [_final_bn(b.module)
                                                                                for b in self.bn_inputs]
        for bn in self.bns + [b.module.layers().bn1 for b in self.bn_inputs if isinstance(b.module, SepConv)]:
            if bn.affine:
                raise ValueError(f"{owner}: the fused candidates fold affine-free BatchNorms; got {bn}")
        eps = {bn.eps for bn in self.bns}
        if len(eps) != 1:
            raise ValueError(f"{owner}: the folded BatchNorms must share one eps, got {sorted(eps)}")
        self.eps = eps.pop()

    def specs(self) -> Tuple[Spec, ...]:
        return tuple(b.spec for b in self.bn_inputs)

    def first_modules(self) -> List[nn.Conv2d]:
        """The convolutions of each BN input's chain after the shared ReLU, in ``specs()`` order."""
        out: List[nn.Conv2d] = []
        for b in self.bn_inputs:
            m = b.module
            if isinstance(m, FactorizedReduce):
                out += [m.conv_1, m.conv_2]
            elif isinstance(m, SepConv):
                L = m.layers()
                out += [L.dw1, L.pw1]
            else:
                L = m.layers()
                out += [L.dw, L.pw]
        return out

    def first_weights(self) -> List[torch.Tensor]:
        """The weights of :meth:`first_modules`."""
        return [m.weight for m in self.first_modules()]

    def split(self, weights: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(z_weights (P,), pool_weights (2,), identity_weight (0-dim) or None)`` from ``weights``."""
        iw = None if self.identity_column is None else weights[self.identity_column]
        return _columns(weights, self.z_columns), _columns(weights, self.pool_columns), iw


def _check_pool(where: str, pool: nn.Module, stride: int) -> None:
    def one(v):
        return v if isinstance(v, int) else v[0] if len(set(v)) == 1 else None
    ok = one(pool.kernel_size) == 3 and one(pool.stride) == stride and one(pool.padding) == 1 and not pool.ceil_mode
    if isinstance(pool, nn.MaxPool2d):
        ok = ok and one(pool.dilation) == 1
    else:
        ok = ok and not pool.count_include_pad and pool.divisor_override is None
    if not ok:
        raise ValueError(f"{where}: the fused mixed sum takes 3x3 pools, padding 1, stride {stride} "
                         f"(avg without padded cells), got {pool}")


def _final_bn(m: nn.Module) -> nn.BatchNorm2d:
    return m.bn if isinstance(m, FactorizedReduce) else m.layers().bn2 if isinstance(m, SepConv) else m.layers().bn


class FusedAttentionMixedOp(ReplayableEdge, ChannelSelectingEdge):
    """The ADARTS edge (docs/method.md section 2) computed with the fused ops.

    ``x: (B, C, H, W)``, ``weights: (len(primitives),)`` (softmax of the edge's alpha row),
    optional ``edge_weight`` (the normalised beta: a 0-dim or one-element tensor, or a Python
    number, as the reference edge takes) -> ``(B, C, H/stride, W/stride)``.
    ``impl`` picks the backend of the fused ops (default: ``ADARTS_KERNELS_IMPL`` / auto).
    ``replay=True``: a re-run inside backward (:func:`~adarts_kernels.nn.recompute.recompute_edge`):
    BatchNorm running statistics stay put and the units keep their intermediates.
    ``selector`` and ``idx``: as :class:`~adarts_kernels.nn.AttentionMixedOp`; without either,
    the channels are the ``idx`` ``adarts::attention_score`` returns; with one, that ``idx`` is
    ignored and the indices are checked by the gather and write-back (``validate_idx``).
    """

    def __init__(self, C: int, stride: int, k: int = 4, impl: Optional[str] = None,
                 primitives: Sequence[str] = PRIMITIVES, selector: Optional[ChannelSelector] = None):
        super().__init__()
        check_k("FusedAttentionMixedOp", C, k)
        if stride not in (1, 2):
            raise ValueError(f"FusedAttentionMixedOp: stride must be 1 or 2, got {stride}")
        self.C, self.stride, self.k, self.impl = C, stride, k, impl
        backend.prepare(impl)                  # the first-use build, if any, happens here, eagerly
        self.attention = ChannelAttention(C)   # same parameters and keys as the reference
        self.cands = Candidates(C // k, stride, primitives)
        self.roles = FusedCandidates(self.cands, stride)
        self.selector = selector
        self.last_idx: Optional[torch.Tensor] = None
        self._plan = EdgePlan(self)
        self._resolved: Optional[tuple] = None

    #: run eagerly as one autograd node (:mod:`.fused_function`) where it may run; ``False``
    #: always composes the ``adarts::`` ops (what ``torch.compile`` traces). Same results.
    one_node: bool = True
    #: :func:`~adarts_kernels.nn.recompute.recompute_edge` hands this edge ``recompute=True``
    recomputes_itself = True

    def _backend(self, device: torch.device) -> str:
        """The backend for tensors on ``device``, resolved once per device, backend setting and
        extension state (``backend.resolve`` reads the environment and the extension)."""
        key = (device.type, self.impl, os.environ.get(backend.ENV), _ext.HAS_EXT)
        if self._resolved is None or self._resolved[0] != key:
            self._resolved = (key, backend.resolve(self.impl, device))
        return self._resolved[1]

    def forward(self, x, weights, edge_weight: Optional[torch.Tensor] = None, *, replay: bool = False,
                idx: Optional[torch.Tensor] = None, recompute: bool = False):
        """``recompute=True``: keep only the inputs (and ``idx``) for backward and re-run the
        edge there, as :func:`~adarts_kernels.nn.recompute.recompute_edge` does (which passes it)."""
        check_edge_input("FusedAttentionMixedOp", x, weights, self.C, self.stride, len(self.cands.primitives))
        ew = _edge_weight(edge_weight, x)
        if batchnorm_mode(self.roles.bns[0])[0]:
            _check_bn_values(x, self.C // self.k, self.stride)
        if self.one_node and eager_path_ok(x):
            trusted = idx is None and getattr(self.selector, "trusted", False) is True
            grad = torch.is_grad_enabled()
            run = Run(self, self._plan, self._backend(x.device), idx, trusted, replay, recompute and grad and not replay)
            params = self._plan.params()
            if grad:
                return apply_edge(run, x, weights, ew, params)
            return edge_forward(run, x, weights, ew, params)[0]      # no graph: nothing kept
        if recompute and torch.is_grad_enabled() and not replay:
            return checkpoint_edge(self, x, weights, edge_weight)
        mlp = self.attention.mlp
        # Under autocast the states may be bfloat16/float16 while weights, alpha and beta stay
        # float32: the fused ops take one dtype, the state's (a no-op in plain float32).
        dt = x.dtype
        a, own_idx = attention_score(x, mlp[0].weight.to(dt), mlp[2].weight.to(dt), self.C // self.k, impl=self.impl)
        trusted = idx is None and getattr(self.selector, "trusted", False) is True
        idx = self._choose(a, self.C // self.k, idx, lambda: own_idx)
        # attention_score's idx is distinct and in range by construction, a replay's was checked
        # in the forward it replays, a trusted selector's is a sort's prefix; any other (an
        # untrusted selector's, a given one) is checked here
        check = idx is not own_idx and not replay and not trusted
        x_sel = attention_gather(x, a, idx, impl=self.impl, validate_idx=check)
        y = self._mixed(x_sel, weights.to(dt), replay)
        ew = None if ew is None else ew.to(dt)
        return attention_writeback(x, a, idx, y, ew, self.stride, impl=self.impl, validate_idx=check)

    def _mixed(self, xs: torch.Tensor, weights: torch.Tensor, replay: bool) -> torch.Tensor:
        """``sum_o weights[o] * op_o(xs)`` over the candidates: ``(B, n, H/s, W/s)``."""
        roles = self.roles
        zs = list(SharedReluConvs.apply(xs, roles.specs(), replay, *roles.first_weights()))
        count = xs.shape[0] * (xs.shape[2] // self.stride) * (xs.shape[3] // self.stride)
        # the second half of each sep_conv, its first BN folded in (merged where it pays)
        seps = [(i, b.module.layers()) for i, b in enumerate(roles.bn_inputs) if isinstance(b.module, SepConv)]
        if seps:
            confs, rms, rvs = units.sep_settings([L for _, L in seps])
            out = BnReluDwPwSeps.apply(confs, units._merge_pays(xs, xs.shape[1]), replay, rms, rvs,
                                       *[zs[i] for i, _ in seps], *[L.dw2.weight for _, L in seps],
                                       *[L.pw2.weight for _, L in seps])
            S = len(seps)
            for j, (i, L) in enumerate(seps):
                zs[i] = out[j]
                if not replay:      # no-op in eval mode
                    update_running_stats([L.bn1], out[S + j][None], out[2 * S + j][None], count)
        z_w, pool_w, id_w = roles.split(weights)
        training, _, _ = batchnorm_mode(roles.bns[0])
        if training:
            y, mean, var = mixed_sum(zs, xs, z_w, pool_w, id_w, self.stride, roles.eps, impl=self.impl)
            if not replay:
                update_running_stats(roles.bns, mean, var, count)
        else:
            rm = torch.stack([bn.running_mean for bn in roles.bns])
            rv = torch.stack([bn.running_var for bn in roles.bns])
            y, _, _ = mixed_sum(zs, xs, z_w, pool_w, id_w, self.stride, roles.eps, rm, rv, impl=self.impl)
        return y

    def extra_repr(self) -> str:
        return f"C={self.C}, stride={self.stride}, k={self.k}, impl={self.impl}"


def _edge_weight(edge_weight, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The edge weight as the 0-dim tensor ``adarts::attention_writeback`` takes. The reference
    edge multiplies its output by ``edge_weight``, so it takes a Python number or a one-element
    tensor (``(1,)``...) too: those become 0-dim here (a tensor through ``reshape``, so its
    gradient flows back in its own shape)."""
    if edge_weight is None:
        return None
    if isinstance(edge_weight, torch.Tensor):
        if edge_weight.numel() != 1 or edge_weight.dim() > 4:
            raise ValueError("FusedAttentionMixedOp: edge_weight must be a 0-dim or one-element tensor "
                             f"(the edge's normalised beta), got shape {tuple(edge_weight.shape)}")
        return edge_weight.reshape(())
    if isinstance(edge_weight, (int, float)) and not isinstance(edge_weight, bool):
        return torch.tensor(float(edge_weight), dtype=x.dtype, device=x.device)
    raise TypeError("FusedAttentionMixedOp: edge_weight must be None, a number or a one-element tensor, "
                    f"got {type(edge_weight).__name__}")


def _check_bn_values(x: torch.Tensor, n: int, stride: int) -> None:
    """Training BatchNorm needs more than one value per channel. The candidates' BNs see
    ``(B, n, H/stride, W/stride)``; with ``B * H/stride * W/stride == 1`` the reference edge's
    first BN raises torch's error, so the fused edge raises the same, before any state changes
    (the folded BNs would otherwise drive ``running_var`` toward 0 without a word)."""
    B, _, H, W = x.shape
    if B * (H // stride) * (W // stride) == 1:
        size = torch.Size((B, n, H // stride, W // stride))
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _bn(z: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    return bn(z) if bn.affine else batch_norm_keep_output(z, bn)


class FusedReLUConvBN(ReLUConvBN):
    """:class:`~adarts_kernels.nn.operations.ReLUConvBN` (same parameters, keys and function)
    that keeps for backward only its input and, when the BN is affine-free, the BN output
    (the cell state, which the edges keep anyway): ReLU output and BN input are not kept."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.op[1], self.op[2]
        (z,) = SharedReluConvs.apply(x, (("conv", conv.stride[0], conv.padding[0]),), False, conv.weight)
        return _bn(z, bn)


class FusedFactorizedReduce(FactorizedReduce):
    """:class:`~adarts_kernels.nn.operations.FactorizedReduce` (same parameters, keys and
    function) that keeps only its input and (affine-free BN) its output, as :class:`FusedReLUConvBN`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"FactorizedReduce needs even H and W, got input of shape {tuple(x.shape)}")
        (z,) = SharedReluConvs.apply(x, (("fr",),), False, self.conv_1.weight, self.conv_2.weight)
        return _bn(z, self.bn)
