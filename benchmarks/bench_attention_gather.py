#!/usr/bin/env python
"""adarts::attention_gather, every backend: time and bandwidth."""
from _harness import element_size as es, run_op_benchmark

import torch
from adarts_kernels.ops import attention_gather


def make(B, C, S, device, dtype):
    x = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    a = torch.rand(B, C, device=device, dtype=dtype).requires_grad_()
    idx = torch.randperm(C, device=device)[:C // 4]
    return x, a, idx


def fwd(inp, impl):
    x, a, idx = inp
    return attention_gather(x, a, idx, impl=impl)


# fwd: read 1/4 of x, write x_sel (1/4); bwd: read grad (1/4), x (1/4), write dx (all of it)
if __name__ == "__main__":
    run_op_benchmark("attention_gather", make, fwd,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * 0.5,
                     lambda B, C, S, dt: B * C * S * S * es(dt) * 1.5)
