"""The planted bugs of the mutation probe (``tests/mutation/probe.py``).

Each mutant is one small, plausible bug: ``find`` occurs exactly once in ``file`` (checked by
``tests/test_mutation_list.py``, so the list follows the sources) and is replaced by
``replace``; ``tests`` and ``k`` are the pytest selection expected to fail with it planted.
Backends: the plain-PyTorch reference and the modules (``adarts_kernels/ops``,
``adarts_kernels/nn``), the C++ CPU kernels (``csrc/cpu``, rebuilt per mutant), the CUDA
kernels (``csrc/cuda``, through the CPU emulation of ``tests/cuda_emu``, which compiles the
sources itself) and the Triton kernels (``adarts_kernels/triton``, interpreted on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

#: Every kind of bug the list must cover.
KINDS = (
    "loop bound",
    "tie rule",
    "variance correction",
    "epsilon",
    "barrier",
    "boundary condition",
    "mask",
    "accumulation dtype",
    "skipped running-statistics update",
    "backward scaling",
)

#: The bugs of issue 18 that once went unseen (names of mutants below).
ISSUE_MUTANTS = (
    "triton_gather_fwd_load_unmasked",    # Triton load without its mask
    "cuda_block_sum_trailing_barrier",     # block_sum's trailing __syncthreads() removed
    "triton_acc_float16",                  # float16 accumulation for float16 inputs
    "cpp_score_grad_rel_1e-4",             # a 1e-4 relative error in a C++ gradient
)


@dataclass(frozen=True)
class Mutant:
    name: str
    kind: str
    file: str                    # relative to the repository root
    find: str                    # occurs exactly once in file
    replace: str
    tests: Tuple[str, ...]       # test files (relative to the repository root)
    k: Optional[str] = None      # pytest -k expression
    note: str = ""

    @property
    def backend(self) -> str:
        if self.file.startswith("csrc/cpu/") or self.file.startswith("csrc/edge"):
            return "cpp"
        if self.file.startswith("csrc/cuda/"):
            return "cuda"
        if self.file.startswith("adarts_kernels/triton/"):
            return "triton"
        return "python"


OPS = "tests/ops/"
EMU = ("tests/test_cuda_emulated.py",)

MUTANTS: Tuple[Mutant, ...] = (
    # ------------------------------------------------------------ reference and modules (Python)
    Mutant("ref_writeback_da_without_beta", "backward scaling", "adarts_kernels/ops/reference.py",
           "    da = gm.sum(dim=(2, 3)) * bf\n",
           "    da = gm.sum(dim=(2, 3))\n",
           (OPS + "test_attention_writeback.py",), "reference",
           "the reference's attention gradient misses its beta factor"),
    Mutant("ref_writeback_keep_as_product", "mask", "adarts_kernels/ops/reference.py",
           "    dm = torch.where(keep, g * af[:, :, None, None] * bf, zero)",
           "    dm = g * af[:, :, None, None] * bf * keep",
           (OPS + "test_attention_writeback.py",), "reference",
           "bypass mask multiplied instead of selected: 0 * NaN leaks from overwritten channels"),
    Mutant("ref_mixed_sum_fwd_no_eps", "epsilon", "adarts_kernels/ops/reference.py",
           "    rstd = torch.rsqrt(var + eps)\n    vs = [pf[0], pf[1]] + [zf[i] for i in range(len(z))]\n    y = None\n",
           "    rstd = torch.rsqrt(var)\n    vs = [pf[0], pf[1]] + [zf[i] for i in range(len(z))]\n    y = None\n",
           (OPS + "test_mixed_sum.py",), "reference or cpp"),
    Mutant("ref_acc_dtype_float16", "accumulation dtype", "adarts_kernels/ops/reference.py",
           "    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype\n",
           "    return torch.float32 if dtype == torch.bfloat16 else dtype\n",
           (OPS + "test_mixed_sum.py",), "reference or cpp",
           "the reference accumulates float16 inputs in float16"),
    Mutant("nn_running_var_not_updated", "skipped running-statistics update", "adarts_kernels/nn/batchnorm.py",
           "                                 [m for _, _, m, _ in items] + unbiased, momentum)\n",
           "                                 [m for _, _, m, _ in items] + [rv for _, rv, _, _ in items], momentum)\n",
           ("tests/test_units.py",), "running_stats"),
    Mutant("nn_running_var_biased", "variance correction", "adarts_kernels/nn/batchnorm.py",
           "    factor = count / max(count - 1, 1)\n",
           "    factor = 1.0\n",
           ("tests/test_units.py",), "running_stats",
           "the running variance gets the biased batch variance"),
    Mutant("fused_edge_running_stats_skipped", "skipped running-statistics update",
           "adarts_kernels/nn/fused_function.py",
           "    if update:   # every BN of the edge in one batched update (no-op for BNs in eval mode)\n",
           "    if False:\n",
           ("tests/test_fused_edge.py",), None,
           "the fused edge's training forward (one autograd node) leaves its BNs' running statistics alone"),
    Mutant("fused_composed_running_stats_skipped", "skipped running-statistics update", "adarts_kernels/nn/fused.py",
           "                update_running_stats(roles.bns, mean, var, count)\n",
           "                pass\n",
           ("tests/test_fused_function.py",), None,
           "the composed ops' path (what torch.compile traces) leaves the BNs' running statistics alone"),
    Mutant("fused_edge_dx_without_score_term", "backward scaling", "adarts_kernels/nn/fused_function.py",
           "    dx = dx_wb + dx_g + dx_s\n",
           "    dx = dx_wb + dx_g\n",
           ("tests/test_fused_edge.py",), None,
           "the one-node edge's input gradient misses the attention scoring's term"),
    Mutant("cpp_edge_running_stats_skipped", "skipped running-statistics update", "csrc/edge.cpp",
           "    at::_foreach_lerp_(dst, src, momentum);\n",
           "    (void)dst;\n",
           ("tests/test_fused_edge.py",), "cpp",
           "the fused edge's C++ host sequence leaves the BNs' running statistics alone"),
    Mutant("cpp_edge_sep_bn_no_stat_terms", "backward scaling", "csrc/edge.cpp",
           "    g = g - g.mean({0, 2, 3}, true) - uh * (g * uh).mean({0, 2, 3}, true);\n",
           "    g = g - g.mean({0, 2, 3}, true);\n",
           ("tests/test_fused_edge.py",), "cpp",
           "the sep_conv's folded first BN loses its variance term in the C++ backward"),
    Mutant("units_merged_kernel_off_centre", "boundary condition", "adarts_kernels/nn/units.py",
           "        o, k = (K - w.shape[-1]) // 2, w.shape[-1]\n        (wk[j] if side_by_side",
           "        o, k = 0, w.shape[-1]\n        (wk[j] if side_by_side",
           ("tests/test_units.py",), None,
           "a merged depthwise convolution's smaller kernel is not centred in the common window"),
    Mutant("cpp_edge_merged_grad_off_centre", "boundary condition", "csrc/edge.cpp",
           "    const int64_t k = w0s[j].size(-1), o = (K - k) / 2;\n    dw0s.push_back(",
           "    const int64_t k = w0s[j].size(-1), o = 0;\n    dw0s.push_back(",
           ("tests/test_fused_function.py",), "cpp",
           "the C++ sequence reads a merged group's smaller kernel gradient off centre"),
    Mutant("cpp_edge_node_saves_var", "variance correction", "csrc/edge_node.cpp",
           "saved.insert(saved.end(), {res[at], res[at + 1], res[at + 3]});",
           "saved.insert(saved.end(), {res[at], res[at + 1], res[at + 2]});",
           ("tests/test_fused_function.py",), "cpp",
           "the C++ autograd node keeps a sep_conv BN's variance where its backward reads 1/std"),
    Mutant("cpp_edge_merged_sep_first_slice", "boundary condition", "csrc/edge.cpp",
           "      bn_bwd(i, part(std::get<0>(gb), j, m, true), uhs[j]);\n",
           "      bn_bwd(i, part(std::get<0>(gb), 0, m, true), uhs[j]);\n",
           ("tests/test_fused_function.py",), "cpp",
           "every merged sep_conv half's folded BN backward reads the first half's input gradient"),
    # ------------------------------------------------------------ C++ CPU kernels
    Mutant("cpp_score_grad_rel_1e-4", "backward scaling", "csrc/cpu/attention_score_kernel.cpp",
           "dzp[i] = static_cast<acc_t>(gp[i]) * av * (acc_t(1) - av);",
           "dzp[i] = static_cast<acc_t>(gp[i]) * av * (acc_t(1) - av) * acc_t(1.0001);",
           (OPS + "test_attention_score.py",), "cpp and float16",
           "a 1e-4 relative gradient error; the selection keeps the float16/bfloat16 cases only"),
    Mutant("cpp_score_topk_ties_to_higher", "tie rule", "csrc/cpu/attention_score_kernel.cpp",
           "      return i < j;\n",
           "      return i > j;\n",
           (OPS + "test_attention_score.py",), "cpp and ties"),
    Mutant("cpp_gather_fwd_last_element", "loop bound", "csrc/cpu/attention_gather_kernel.cpp",
           "for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<scalar_t>(static_cast<acc_t>(src[p]) * s);",
           "for (int64_t p = 0; p + 1 < HW; ++p) dst[p] = static_cast<scalar_t>(static_cast<acc_t>(src[p]) * s);",
           (OPS + "test_attention_gather.py",), "cpp"),
    Mutant("cpp_writeback_window_last_max", "tie rule", "csrc/cpu/attention_writeback_kernel.cpp",
           "    if (v > mv || std::isnan(v)) {",
           "    if (v >= mv || std::isnan(v)) {",
           (OPS + "test_attention_writeback.py",), "cpp and ties"),
    Mutant("cpp_writeback_da_without_beta", "backward scaling", "csrc/cpu/attention_writeback_kernel.cpp",
           "dap[i] = static_cast<scalar_t>(has_beta ? sum_gm * bf : sum_gm);",
           "dap[i] = static_cast<scalar_t>(sum_gm);",
           (OPS + "test_attention_writeback.py",), "cpp"),
    Mutant("cpp_mixed_sum_no_eps", "epsilon", "csrc/cpu/mixed_sum_kernel.cpp",
           "nm.rstd[i] = acc_t(1) / std::sqrt(vp[i] + e);",
           "nm.rstd[i] = acc_t(1) / std::sqrt(vp[i]);",
           (OPS + "test_mixed_sum.py",), "cpp"),
    Mutant("cpp_mixed_sum_unbiased_var", "variance correction", "csrc/cpu/mixed_sum_kernel.cpp",
           "      var[q * d.n + c] = m2 / count;\n",
           "      var[q * d.n + c] = m2 / (count - acc_t(1));\n",
           (OPS + "test_mixed_sum.py",), "cpp"),
    Mutant("cpp_mixed_sum_pool_last_max", "tie rule", "csrc/cpu/mixed_sum_kernel.cpp",
           "  return v > m || v != v;\n",
           "  return v >= m || v != v;\n",
           (OPS + "test_mixed_sum.py",), "cpp and ties"),
    Mutant("cpp_mixed_sum_window_end", "boundary condition", "csrc/cpu/mixed_sum_kernel.cpp",
           "{ return std::min<int64_t>(s * o + 2, L); }",
           "{ return std::min<int64_t>(s * o + 2, L - 1); }",
           (OPS + "test_mixed_sum.py",), "cpp",
           "pooling windows lose the last row and column of the plane"),
    Mutant("cpp_mixed_sum_avg_bwd_columns", "loop bound", "csrc/cpu/mixed_sum_kernel.cpp",
           "            for (int64_t k = 0; k + 1 < Wo; ++k) {\n",
           "            for (int64_t k = 0; k + 2 < Wo; ++k) {\n",
           (OPS + "test_mixed_sum.py",), "cpp",
           "stride 2: the avg-pool backward skips the next-to-last output column"),
    # ------------------------------------------------------------ CUDA kernels (CPU emulation)
    Mutant("cuda_block_sum_trailing_barrier", "barrier", "csrc/cuda/common.cuh",
           "  __syncthreads();  // sh may be reused\n",
           "  // sh may be reused\n",
           EMU, "schedules",
           "write-after-read race on the shared partials when block_sum is called twice"),
    Mutant("cuda_warp_sum_short", "loop bound", "csrc/cuda/common.cuh",
           "  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
           "  for (int o = 16; o > 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
           EMU, "attention_gather"),
    Mutant("cuda_score_prefer_higher_index", "tie rule", "csrc/cuda/attention_score_kernel.cu",
           "  return v > bv || (v == bv && i < bi);",
           "  return v > bv || (v == bv && i > bi);",
           EMU, "ties or attention_score"),
    Mutant("cuda_writeback_window_last_max", "tie rule", "csrc/cuda/attention_writeback_kernel.cu",
           "bool beats(A v, A m) { return v > m || v != v; }",
           "bool beats(A v, A m) { return v >= m || v != v; }",
           EMU, "ties or attention_writeback"),
    Mutant("cuda_mixed_sum_no_eps", "epsilon", "csrc/cuda/mixed_sum_kernel.cu",
           "rstd[t] = A(1) / acc_sqrt(var[t] + eps);",
           "rstd[t] = A(1) / acc_sqrt(var[t]);",
           EMU, "mixed_sum"),
    Mutant("cuda_mixed_sum_unbiased_var", "variance correction", "csrc/cuda/mixed_sum_kernel.cu",
           "  var[t] = M2 / count;\n",
           "  var[t] = M2 / (count - A(1));\n",
           EMU, "mixed_sum"),
    Mutant("cuda_mixed_sum_window_end", "boundary condition", "csrc/cuda/mixed_sum_kernel.cu",
           "c1 = min(g.stride * oj + 2, g.W);\n  A best",
           "c1 = min(g.stride * oj + 2, g.W - 1);\n  A best",
           EMU, "mixed_sum",
           "pooling windows lose the last column of the plane"),
    # ------------------------------------------------------------ Triton kernels (interpreted)
    Mutant("triton_gather_fwd_load_unmasked", "mask", "adarts_kernels/triton/attention_gather.py",
           "v = tl.load(x_ptr + b * stride_xb + c * stride_xc + hw, mask=mask, other=0.0).to(ACC_DTYPE)",
           "v = tl.load(x_ptr + b * stride_xb + c * stride_xc + hw).to(ACC_DTYPE)",
           (OPS + "test_attention_gather.py", OPS + "test_triton_bounds.py"), "triton and gather",
           "reads past the plane's end; the store keeps its mask"),
    Mutant("triton_gather_bwd_store_unmasked", "mask", "adarts_kernels/triton/attention_gather.py",
           "        tl.store(dx_base + hw, dx.to(dx_ptr.dtype.element_ty), mask=mask)\n",
           "        tl.store(dx_base + hw, dx.to(dx_ptr.dtype.element_ty))\n",
           (OPS + "test_attention_gather.py", OPS + "test_triton_bounds.py"), "triton and gather"),
    Mutant("triton_acc_float16", "accumulation dtype", "adarts_kernels/triton/_common.py",
           "    return tl.float64 if dtype == torch.float64 else tl.float32\n",
           "    return tl.float64 if dtype == torch.float64 else (tl.float16 if dtype == torch.float16 else tl.float32)\n",
           (OPS + "test_mixed_sum.py", OPS + "test_attention_score.py", OPS + "test_attention_gather.py"),
           "triton", "float16 inputs accumulated in float16 (writeback's tests left out on purpose)"),
    Mutant("triton_score_pool_last_max", "tie rule", "adarts_kernels/triton/attention_score.py",
           "better = mask & (v > lane_max)",
           "better = mask & (v >= lane_max)",
           (OPS + "test_attention_score.py",), "triton"),
    Mutant("triton_mixed_sum_pool_last_max", "tie rule", "adarts_kernels/triton/mixed_sum.py",
           "upd = ok & ((v > mx) | (v != v))",
           "upd = ok & ((v >= mx) | (v != v))",
           (OPS + "test_mixed_sum.py",), "triton"),
    Mutant("triton_mixed_sum_window_rows", "loop bound", "adarts_kernels/triton/mixed_sum.py",
           "    cnt = tl.zeros([BLOCK], dtype=tl.int32)\n    for kh in tl.static_range(3):\n",
           "    cnt = tl.zeros([BLOCK], dtype=tl.int32)\n    for kh in tl.static_range(2):\n",
           (OPS + "test_mixed_sum.py",), "triton",
           "the 3x3 pooling window loses its last row"),
    Mutant("triton_mixed_sum_window_end", "boundary condition", "adarts_kernels/triton/mixed_sum.py",
           "ok = row_ok & (w >= 0) & (w < W)",
           "ok = row_ok & (w >= 0) & (w < W - 1)",
           (OPS + "test_mixed_sum.py",), "triton"),
    Mutant("triton_mixed_sum_unbiased_var", "variance correction", "adarts_kernels/triton/mixed_sum.py",
           ".square().sum(dim=2)) / (B * HWO)",
           ".square().sum(dim=2)) / (B * HWO - 1)",
           (OPS + "test_mixed_sum.py",), "triton"),
    Mutant("triton_mixed_sum_bwd_no_eps", "epsilon", "adarts_kernels/triton/mixed_sum.py",
           "    rstd = torch.rsqrt(var + eps).to(acc)\n    mean_a = mean.to(acc).contiguous()\n",
           "    rstd = torch.rsqrt(var).to(acc)\n    mean_a = mean.to(acc).contiguous()\n",
           (OPS + "test_mixed_sum.py",), "triton"),
    Mutant("triton_writeback_dy_without_beta", "backward scaling", "adarts_kernels/triton/attention_writeback.py",
           "tl.store(dy_base + o, (g * beta).to(dy_ptr.dtype.element_ty), mask=smask)",
           "tl.store(dy_base + o, g.to(dy_ptr.dtype.element_ty), mask=smask)",
           (OPS + "test_attention_writeback.py",), "triton"),
)

BY_NAME = {m.name: m for m in MUTANTS}
