"""Architecture updates (docs/method.md section 4): first order (default) and second order (DARTS).

First order: ``alpha <- Adam step on dL_val/dalpha`` at the current weights.

Second order (unrolled): with the one-step look-ahead ``w' = w - eta * (m + dL_train/dw + wd*w)``
(``m`` the weight optimizer's momentum buffer times its momentum),

    grad_alpha = dL_val(w', alpha)/dalpha - eta * H v,
    H v ~= (dL_train(w+, alpha)/dalpha - dL_train(w-, alpha)/dalpha) / (2 R),

with ``v = dL_val(w', alpha)/dw'``, ``w+- = w +- R v`` and ``R = 0.01 / ||v||`` (the
finite-difference Hessian-vector product of DARTS). The network's weights and buffers are
restored exactly afterwards. No value is read back to the host.

Data parallelism (``reduce``, ``scale``): each rank computes its gradients on its shard, its
losses multiplied by ``scale`` (``world_size * local_batch / global_batch``, 1 for equal
shards), and ``reduce(tensors)`` averages them over the ranks in place
(:func:`adarts_kernels.distributed.average_`): the architecture gradient of a first-order
step, and in a second-order step the training gradient of the virtual step, the validation
gradients at ``w'`` (``dalpha`` and ``v``) and the finite difference ``g+ - g-``. Every
rank then holds bitwise the same gradients, so alpha and beta stay identical. No weight
gradient is reduced in a first-order step (none is computed).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def scaled_loss(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss * scale``; ``loss`` itself for 1 (one process, equal shards: no extra op)."""
    return loss * scale if scale != 1.0 else loss


class Architect:
    """Owns the architecture optimizer (Adam) of a :class:`SearchNetwork`.

    ``step(x_train, y_train, x_val, y_val, eta, weight_optimizer)``: one architecture step;
    ``eta`` (the current weight learning rate) and ``weight_optimizer`` are used by the
    unrolled (second-order) step only.
    """

    def __init__(self, model, lr: float = 6e-4, betas=(0.5, 0.999), weight_decay: float = 1e-3,
                 unrolled: bool = False, r: float = 1e-2,
                 reduce: Optional[Callable[[Sequence[torch.Tensor]], None]] = None):
        self.model = model
        self.unrolled = unrolled
        self.r = r
        #: averages gradients over the ranks in place (data parallelism); ``None``: one process
        self.reduce = reduce
        self.optimizer = torch.optim.Adam(model.arch_parameters(), lr=lr, betas=tuple(betas),
                                          weight_decay=weight_decay)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def step(self, x_train, y_train, x_val, y_val, eta: float = 0.0,
             weight_optimizer: Optional[torch.optim.Optimizer] = None, scale: float = 1.0) -> torch.Tensor:
        """One architecture step; returns this process's validation loss (a 0-dim tensor, not
        synced). ``scale``: see the module docstring (data parallelism)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.unrolled:
            loss = self._unrolled_grads(x_train, y_train, x_val, y_val, eta, weight_optimizer, scale)
        else:
            loss = self.model.loss(x_val, y_val)
            arch = self.model.arch_parameters()
            grads = torch.autograd.grad(scaled_loss(loss, scale), arch)
            if self.reduce is not None:
                grads = [g.contiguous() for g in grads]
                self.reduce(grads)
            for p, g in zip(arch, grads):
                p.grad = g
        self.optimizer.step()
        return loss.detach()

    # -- second order -----------------------------------------------------------------
    def _unrolled_grads(self, x_train, y_train, x_val, y_val, eta, weight_optimizer, scale=1.0):
        model = self.model
        weights: List[torch.Tensor] = list(model.weight_parameters())
        arch = model.arch_parameters()
        saved_w = [w.detach().clone() for w in weights]
        saved_b = [b.detach().clone() for b in model.buffers()]

        momentum, wd = 0.0, 0.0
        if weight_optimizer is not None:
            group = weight_optimizer.param_groups[0]
            momentum, wd = group.get("momentum", 0.0), group.get("weight_decay", 0.0)

        try:
            # w' = w - eta * (m + g + wd * w)
            g_train = torch.autograd.grad(scaled_loss(model.loss(x_train, y_train), scale), weights,
                                          allow_unused=True)
            if self.reduce is not None:
                g_train = [g if g is not None else torch.zeros_like(w) for g, w in zip(g_train, weights)]
                self.reduce(g_train)
            with torch.no_grad():
                for w, g in zip(weights, g_train):
                    step = (g if g is not None else torch.zeros_like(w)) + wd * w
                    if weight_optimizer is not None and momentum:
                        buf = weight_optimizer.state.get(w, {}).get("momentum_buffer")
                        if buf is not None:
                            step = step + momentum * buf
                    w.sub_(eta * step)

            # gradients of the validation loss at w'
            loss_val = model.loss(x_val, y_val)
            grads = torch.autograd.grad(scaled_loss(loss_val, scale), arch + weights, allow_unused=True)
            d_alpha = [g if g is not None else torch.zeros_like(a) for g, a in zip(grads[:len(arch)], arch)]
            v = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads[len(arch):], weights)]
            if self.reduce is not None:
                self.reduce(d_alpha + v)

            # finite-difference Hessian-vector product at the original w
            R = self.r / torch.cat([t.flatten() for t in v]).norm().clamp_min(1e-12)
            with torch.no_grad():
                for w, w0, vi in zip(weights, saved_w, v):
                    w.copy_(w0 + R * vi)
            g_pos = torch.autograd.grad(scaled_loss(model.loss(x_train, y_train), scale), arch)
            with torch.no_grad():
                for w, w0, vi in zip(weights, saved_w, v):
                    w.copy_(w0 - R * vi)
            g_neg = torch.autograd.grad(scaled_loss(model.loss(x_train, y_train), scale), arch)
            diff = [gp - gn for gp, gn in zip(g_pos, g_neg)]
            if self.reduce is not None:
                self.reduce(diff)

            for a, da, d in zip(arch, d_alpha, diff):
                a.grad = da - eta * d / (2 * R)
        finally:
            with torch.no_grad():
                for w, w0 in zip(weights, saved_w):
                    w.copy_(w0)
                for b, b0 in zip(model.buffers(), saved_b):
                    b.copy_(b0)
        return loss_val
