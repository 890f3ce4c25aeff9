// CUDA binding of adarts_C::mixed_sum_fwd / mixed_sum_bwd (schemas in csrc/adarts.cpp):
// argument checks, output allocation, and calls of the launchers of csrc/cuda/mixed_sum_kernel.cu
// (kernels.h). The attention ops' bindings are csrc/cuda/attention_*_binding.cpp; the helpers
// they all share are csrc/cuda/binding.h.
//
// The checks are the CPU kernel's (csrc/validate.h), called with
// c10::DeviceType::CUDA, plus the 32-bit size limits of the CUDA kernels.
//
// Compiled only into a CUDA build of the extension (WITH_CUDA defined, torch built with
// CUDA); everything below is guarded so that a CPU build may list this file harmlessly.
// Nothing here synchronises with the device: outputs and workspaces come from the caching
// allocator (at::empty), every kernel is enqueued on the current stream.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../validate.h"
#include "binding.h"

namespace adarts {
namespace {

// ---------------------------------------------------------------------------- 4. mixed sum
constexpr const char* kMixed = "mixed_sum";

MixedSumDims check_mixed(at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights,
                         const at::Tensor& pool_weights, const std::optional<at::Tensor>& identity_weight,
                         int64_t stride, double eps) {
  const MixedSumDims d = validate_mixed_sum(kMixed, z, x, z_weights, pool_weights, identity_weight, stride, kCUDA);
  validate_mixed_sum_eps(kMixed, eps);
  check_plane_limits(kMixed, x);
  return d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_sum_fwd_cuda(
    at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights, const at::Tensor& pool_weights,
    const std::optional<at::Tensor>& identity_weight, int64_t stride, double eps,
    const std::optional<at::Tensor>& run_mean, const std::optional<at::Tensor>& run_var) {
  const MixedSumDims d = check_mixed(z, x, z_weights, pool_weights, identity_weight, stride, eps);
  validate_mixed_sum_running(kMixed, run_mean, run_var, x, d, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kMixed, x);
  const bool training = !run_mean.has_value();

  const auto sopt = x.options().dtype(mixed_sum_stats_dtype(x));
  at::Tensor y = at::empty({d.B, d.n, d.Ho, d.Wo}, x.options());
  at::Tensor mean = at::empty({d.Q, d.n}, sopt), var = at::empty({d.Q, d.n}, sopt);
  if (!training) {  // copies in the statistics dtype, enqueued on the current stream
    mean.copy_(*run_mean);
    var.copy_(*run_var);
  }
  std::array<const void*, cuda::kMixedSumMaxZ> zp{};
  for (size_t i = 0; i < z.size(); ++i) zp[i] = z[i].const_data_ptr();
  const int P = static_cast<int>(d.P);
  at::Tensor ws = workspace(x, cuda::mixed_sum_fwd_workspace_bytes(dt, d.B, d.n, P));
  const int err = cuda::mixed_sum_fwd(
      dt, zp.data(), P, x.const_data_ptr(), z_weights.const_data_ptr(), pool_weights.const_data_ptr(),
      identity_weight.has_value() ? identity_weight->const_data_ptr() : nullptr, d.B, d.n, d.H, d.W,
      static_cast<int>(stride), eps, training ? 1 : 0, mean.mutable_data_ptr(), var.mutable_data_ptr(),
      y.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream());
  check_launch(kMixed, "mixed_sum_fwd", err);
  return {y, mean, var};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_sum_bwd_cuda(
    const at::Tensor& grad, at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights,
    const at::Tensor& pool_weights, const std::optional<at::Tensor>& identity_weight, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, double eps, bool training) {
  const MixedSumDims d = check_mixed(z, x, z_weights, pool_weights, identity_weight, stride, eps);
  validate_mixed_sum_bwd(kMixed, grad, mean, var, x, d, kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::DType dt = dtype_of(kMixed, x);

  std::vector<at::Tensor> dz;
  dz.reserve(z.size());
  std::array<const void*, cuda::kMixedSumMaxZ> zp{};
  std::array<void*, cuda::kMixedSumMaxZ> dzp{};
  for (size_t i = 0; i < z.size(); ++i) {
    dz.push_back(at::empty(z[i].sizes(), z[i].options()));
    zp[i] = z[i].const_data_ptr();
    dzp[i] = dz.back().mutable_data_ptr();
  }
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dzw = at::empty(z_weights.sizes(), z_weights.options());
  at::Tensor dpw = at::empty(pool_weights.sizes(), pool_weights.options());
  // 0-dim; the kernels write 0 without the identity term (the op cannot return None)
  at::Tensor diw = at::empty({}, identity_weight.has_value() ? identity_weight->options() : pool_weights.options());
  const int P = static_cast<int>(d.P);
  at::Tensor ws = workspace(x, cuda::mixed_sum_bwd_workspace_bytes(dt, d.B, d.n, d.H, d.W, static_cast<int>(stride), P));
  const int err = cuda::mixed_sum_bwd(
      dt, grad.const_data_ptr(), zp.data(), P, x.const_data_ptr(), z_weights.const_data_ptr(),
      pool_weights.const_data_ptr(), identity_weight.has_value() ? identity_weight->const_data_ptr() : nullptr,
      mean.const_data_ptr(), var.const_data_ptr(), d.B, d.n, d.H, d.W, static_cast<int>(stride), eps,
      training ? 1 : 0, dzp.data(), dx.mutable_data_ptr(), dzw.mutable_data_ptr(), dpw.mutable_data_ptr(),
      diw.mutable_data_ptr(), ws.mutable_data_ptr(), current_stream());
  check_launch(kMixed, "mixed_sum_bwd", err);
  return {dz, dx, dzw, dpw, diw};
}

}  // namespace

TORCH_LIBRARY_IMPL(adarts_C, CUDA, m) {
  m.impl("mixed_sum_fwd", &mixed_sum_fwd_cuda);
  m.impl("mixed_sum_bwd", &mixed_sum_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
