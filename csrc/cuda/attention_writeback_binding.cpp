// CUDA binding of adarts_C::attention_writeback_fwd / attention_writeback_bwd (schemas in csrc/adarts.cpp):
// the edge output beta * out, and the backward to x, a, y and beta.
//
// The checks are the CPU kernel's (csrc/validate.h), called with c10::DeviceType::CUDA
// ("CUDA tensor on x's device" in place of "CPU tensor"), plus the 32-bit size limits of the
// CUDA kernels (csrc/cuda/attention_writeback_kernel.cu, launchers declared in kernels.h).
// idx's *values* (in [0, C), distinct) are not checked here, since reading them would
// synchronise with the device: the Python layer (adarts_kernels/ops/_common.py,
// check_idx_values) checks them with asynchronous device asserts unless the caller vouches for
// them (validate_idx=False), and the kernels never access memory out of bounds for a bad idx
// (they skip such entries and trip a device assert in builds without NDEBUG).
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
#include <optional>
#include <tuple>

#include "binding.h"

namespace adarts {
namespace {

constexpr const char* kWriteback = "attention_writeback";

using Dims = WritebackDims;

Dims check_writeback(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx, const at::Tensor& y,
                     const std::optional<at::Tensor>& beta, int64_t stride) {
  validate_stride(kWriteback, stride);
  check_x_a(kWriteback, x, a);
  Dims d = writeback_dims(kWriteback, x, stride);
  d.n = check_idx(kWriteback, idx, x, kCUDA);
  validate_writeback_y_beta(kWriteback, x, y, beta, d, stride, kCUDA);
  return d;
}

at::Tensor attention_writeback_fwd_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx,
                                        const at::Tensor& y, const std::optional<at::Tensor>& beta, int64_t stride) {
  const Dims d = check_writeback(x, a, idx, y, beta, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kWriteback, x);

  at::Tensor out = at::empty({d.B, d.C, d.Ho, d.Wo}, x.options());
  if (out.numel() == 0) return out;
  at::Tensor ws = workspace(x, cuda::attention_writeback_fwd_workspace_bytes(d.C));
  const void* bp = beta.has_value() ? beta->const_data_ptr() : nullptr;
  const int err = cuda::attention_writeback_fwd(dt, x.const_data_ptr(), a.const_data_ptr(),
                                                idx.const_data_ptr<int64_t>(), y.const_data_ptr(), bp, d.B, d.C, d.H,
                                                d.W, d.n, static_cast<int>(stride), out.mutable_data_ptr(),
                                                ws.mutable_data_ptr(), current_stream());
  check_launch(kWriteback, "attention_writeback_fwd", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_writeback_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx, const at::Tensor& y,
    const std::optional<at::Tensor>& beta, int64_t stride) {
  const Dims d = check_writeback(x, a, idx, y, beta, stride);
  validate_writeback_grad(kWriteback, grad, x, d, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kWriteback, x);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  at::Tensor dy = at::empty(y.sizes(), y.options());
  const bool has_beta = beta.has_value();
  // beta None: a zero 0-dim tensor of x's dtype (a fill kernel, no synchronisation).
  at::Tensor dbeta = has_beta ? at::empty(beta->sizes(), beta->options()) : at::zeros({}, x.options());
  if (d.B * d.C == 0 && !has_beta) return {dx, da, dy, dbeta};
  at::Tensor ws = workspace(x, cuda::attention_writeback_bwd_workspace_bytes(dt, d.B, d.C));
  const int err = cuda::attention_writeback_bwd(
      dt, grad.const_data_ptr(), x.const_data_ptr(), a.const_data_ptr(), idx.const_data_ptr<int64_t>(),
      y.const_data_ptr(), has_beta ? beta->const_data_ptr() : nullptr, d.B, d.C, d.H, d.W, d.n,
      static_cast<int>(stride), dx.mutable_data_ptr(), da.mutable_data_ptr(), dy.mutable_data_ptr(),
      has_beta ? dbeta.mutable_data_ptr() : nullptr, ws.mutable_data_ptr(), current_stream());
  check_launch(kWriteback, "attention_writeback_bwd", err);
  return {dx, da, dy, dbeta};
}

}  // namespace

TORCH_LIBRARY_IMPL(adarts_C, CUDA, m) {
  m.impl("attention_writeback_fwd", &attention_writeback_fwd_cuda);
  m.impl("attention_writeback_bwd", &attention_writeback_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
