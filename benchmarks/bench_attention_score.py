#!/usr/bin/env python
"""adarts::attention_score, every backend: time and bandwidth."""
from _harness import element_size as es, run_op_benchmark

import torch
from adarts_kernels.ops import attention_score


def make(B, C, S, device, dtype):
    x = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    w1 = (0.3 * torch.randn(C // 2, C, device=device, dtype=dtype)).requires_grad_()
    w2 = (0.3 * torch.randn(C, C // 2, device=device, dtype=dtype)).requires_grad_()
    return x, w1, w2


def fwd(inp, impl):
    x, w1, w2 = inp
    return attention_score(x, w1, w2, x.shape[1] // 4, impl=impl)[0]


# fwd: read x once; bwd: read x (pools recomputed), write dx
if __name__ == "__main__":
    run_op_benchmark("attention_score", make, fwd,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * 1.0,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * 2.0)
