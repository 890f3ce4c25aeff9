#!/usr/bin/env python
"""adarts::mixed_sum (weighted mixed sum with the BNs folded in), every backend: time and bandwidth."""
from _harness import element_size as es, run_op_benchmark

import torch
from adarts_kernels.ops import mixed_sum


def make(B, C, S, device, dtype):
    n = C // 4
    x = torch.randn(B, n, S, S, device=device, dtype=dtype, requires_grad=True)
    z = [torch.randn(B, n, S, S, device=device, dtype=dtype, requires_grad=True) for _ in range(4)]
    w = torch.softmax(torch.randn(7, device=device), 0).to(dtype)
    # a stride-1 edge: four convolution inputs, the two pools and the identity
    z_weights, pool_weights, identity_weight = (t.detach().requires_grad_() for t in (w[3:], w[:2], w[2]))
    return z, x, z_weights, pool_weights, identity_weight


def fwd(inp, impl):
    z, x, z_weights, pool_weights, identity_weight = inp
    return mixed_sum(z, x, z_weights, pool_weights, identity_weight, 1, impl=impl)[0]


# in units of |x_sel| = B*C/4*S*S elements. fwd: read x and the 4 z, write y (6);
# bwd: read grad, x and the 4 z, write the 4 dz and dx (11).
if __name__ == "__main__":
    run_op_benchmark("mixed_sum", make, fwd,
                     lambda B, C, S, dt: B * C // 4 * S * S * es(dt) * 6,
                     lambda B, C, S, dt: B * C // 4 * S * S * es(dt) * 11)
