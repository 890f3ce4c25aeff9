// CUDA binding of adarts_C::attention_gather_fwd / attention_gather_bwd (schemas in csrc/adarts.cpp):
// x_sel = (x * a)[:, idx], and the backward to x and a.
//
// The checks are the CPU kernel's (csrc/validate.h), called with c10::DeviceType::CUDA
// ("CUDA tensor on x's device" in place of "CPU tensor"), plus the 32-bit size limits of the
// CUDA kernels (csrc/cuda/attention_gather_kernel.cu, launchers declared in kernels.h).
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
#include <tuple>

#include "binding.h"

namespace adarts {
namespace {

constexpr const char* kGather = "attention_gather";

at::Tensor attention_gather_fwd_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx) {
  check_x_a(kGather, x, a);
  const int64_t n = check_idx(kGather, idx, x, kCUDA);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kGather, x);

  at::Tensor out = at::empty({B, n, H, W}, x.options());
  if (out.numel() == 0) return out;
  const int err = cuda::attention_gather_fwd(dt, x.const_data_ptr(), a.const_data_ptr(), idx.const_data_ptr<int64_t>(),
                                             B, C, H * W, n, out.mutable_data_ptr(), current_stream());
  check_launch(kGather, "attention_gather_fwd", err);
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_gather_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& a, const at::Tensor& idx) {
  check_x_a(kGather, x, a);
  const int64_t n = check_idx(kGather, idx, x, kCUDA);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  validate_gather_grad(kGather, grad, x, n, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kGather, x);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  if (B * C == 0) return {dx, da};
  at::Tensor ws = workspace(x, cuda::attention_gather_bwd_workspace_bytes(C));
  const int err = cuda::attention_gather_bwd(dt, grad.const_data_ptr(), x.const_data_ptr(), a.const_data_ptr(),
                                             idx.const_data_ptr<int64_t>(), B, C, H * W, n, dx.mutable_data_ptr(),
                                             da.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream());
  check_launch(kGather, "attention_gather_bwd", err);
  return {dx, da};
}

}  // namespace

TORCH_LIBRARY_IMPL(adarts_C, CUDA, m) {
  m.impl("attention_gather_fwd", &attention_gather_fwd_cuda);
  m.impl("attention_gather_bwd", &attention_gather_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
