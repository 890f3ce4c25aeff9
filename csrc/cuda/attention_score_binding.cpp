// CUDA binding of adarts_C::attention_score_fwd / attention_score_bwd (schemas in csrc/adarts.cpp):
// channel attention a and the selected channels idx, and the backward to x, w1, w2.
//
// The checks are the CPU kernel's (csrc/validate.h), called with c10::DeviceType::CUDA
// ("CUDA tensor on x's device" in place of "CPU tensor"), plus the 32-bit size limits of the
// CUDA kernels (csrc/cuda/attention_score_kernel.cu, launchers declared in kernels.h).
//
// Compiled only into a CUDA build of the extension (WITH_CUDA defined, torch built with
// CUDA); everything below is guarded so that a CPU build may list this file harmlessly.
// Nothing here synchronises with the device: outputs and workspaces come from the caching
// allocator (at::empty), every kernel is enqueued on the current stream.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "binding.h"

namespace adarts {
namespace {

constexpr const char* kScore = "attention_score";

void check_x_w(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  check_x(kScore, x);
  validate_score_weights(kScore, x, w1, w2, kCUDA);
  // The MLP runs as tiled GEMMs: rows (2B, C, C/2) are limited by the grid's y extent.
  check_limit(kScore, "2*B (rows of the attention MLP's GEMM)", 2 * x.size(0), cuda::kMaxGemmRows, x);
  check_limit(kScore, "the channel count (rows of the attention MLP's GEMM)", x.size(1), cuda::kMaxGemmRows, x);
  check_limit(kScore, "the hidden size w1.size(0) (rows of the attention MLP's GEMM)", w1.size(0),
              cuda::kMaxGemmRows, x);
}

std::tuple<at::Tensor, at::Tensor> attention_score_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                            const at::Tensor& w2, int64_t n_select) {
  check_x_w(x, w1, w2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), R = w1.size(0);
  validate_n_select(kScore, n_select, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kScore, x);

  at::Tensor a = at::empty({B, C}, x.options());
  at::Tensor idx = at::empty({n_select}, x.options().dtype(at::kLong));
  at::Tensor ws = workspace(x, cuda::attention_score_fwd_workspace_bytes(dt, B, C, R));
  const int err = cuda::attention_score_fwd(dt, x.const_data_ptr(), w1.const_data_ptr(), w2.const_data_ptr(), B, C,
                                            HW, R, n_select, a.mutable_data_ptr(), idx.mutable_data_ptr<int64_t>(),
                                            ws.mutable_data_ptr(), current_stream());
  check_launch(kScore, "attention_score_fwd", err);
  return {a, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_score_bwd_cuda(const at::Tensor& grad_a,
                                                                        const at::Tensor& x,
                                                                        const at::Tensor& w1,
                                                                        const at::Tensor& w2,
                                                                        const at::Tensor& a) {
  check_x_w(x, w1, w2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), R = w1.size(0);
  validate_score_bwd(kScore, grad_a, a, x, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kScore, x);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw1 = at::empty(w1.sizes(), w1.options());
  at::Tensor dw2 = at::empty(w2.sizes(), w2.options());
  at::Tensor ws = workspace(x, cuda::attention_score_bwd_workspace_bytes(dt, B, C, R));
  const int err = cuda::attention_score_bwd(dt, grad_a.const_data_ptr(), x.const_data_ptr(), w1.const_data_ptr(),
                                            w2.const_data_ptr(), a.const_data_ptr(), B, C, HW, R,
                                            dx.mutable_data_ptr(), dw1.mutable_data_ptr(), dw2.mutable_data_ptr(),
                                            ws.mutable_data_ptr(), current_stream());
  check_launch(kScore, "attention_score_bwd", err);
  return {dx, dw1, dw2};
}

}  // namespace

TORCH_LIBRARY_IMPL(adarts_C, CUDA, m) {
  m.impl("attention_score_fwd", &attention_score_fwd_cuda);
  m.impl("attention_score_bwd", &attention_score_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
