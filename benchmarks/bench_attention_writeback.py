#!/usr/bin/env python
"""adarts::attention_writeback (stride 1, with beta), every backend: time and bandwidth."""
from _harness import element_size as es, run_op_benchmark

import torch
from adarts_kernels.ops import attention_writeback


def make(B, C, S, device, dtype):
    n = C // 4
    x = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    a = torch.rand(B, C, device=device, dtype=dtype).requires_grad_()
    idx = torch.randperm(C, device=device)[:n]
    y = torch.randn(B, n, S, S, device=device, dtype=dtype, requires_grad=True)
    beta = torch.tensor(0.3, device=device, dtype=dtype, requires_grad=True)
    return x, a, idx, y, beta


def fwd(inp, impl):
    x, a, idx, y, beta = inp
    return attention_writeback(x, a, idx, y, beta, 1, impl=impl)


# bytes that must move: fwd reads the bypass 3/4 of x and y (1/4), writes out; bwd reads grad,
# x (bypass), y, writes dx and dy
if __name__ == "__main__":
    run_op_benchmark("attention_writeback", make, fwd,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * 2.0,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * (1 + 0.75 + 0.25 + 1 + 0.25))
