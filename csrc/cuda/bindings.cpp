// CUDA implementations of the adarts_C operators (schemas in csrc/adarts.cpp): argument
// checks, output allocation, and calls of the launchers of csrc/cuda/*.cu (kernels.h).
//
// Compiled only into a CUDA build of the extension (WITH_CUDA defined, torch built with
// CUDA); everything below is guarded so that a CPU build may list this file harmlessly.
//
// The checks are the CPU kernels' (csrc/validate.h, csrc/checks.h), called with
// c10::DeviceType::CUDA ("CUDA tensor on x's device" in place of "CPU tensor"), plus the
// 32-bit size limits of the CUDA kernels. One difference: idx's *values* (in [0, C), distinct)
// are not checked here, since reading them would synchronise with the device; the Python
// layer (adarts_kernels/ops/_common.py) checks them with asynchronous device asserts, and
// the kernels never access memory out of bounds for a bad idx (they skip such entries and
// trip a device assert in builds without NDEBUG).
//
// Nothing here synchronises with the device: outputs and workspaces come from the caching
// allocator (at::empty), every kernel is enqueued on the current stream.
#ifdef WITH_CUDA

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../validate.h"
#include "../validate_mixed_sum.h"
#include "kernels.h"

namespace adarts {
namespace {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

cuda::DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kDouble: return cuda::DType::F64;
    default: break;
  }
  ADARTS_CHECK(false, op, "x must be a floating tensor (float16, bfloat16, float32 or float64), got ",
               t.scalar_type());
  return cuda::DType::F32;  // unreachable
}

void check_launch(const char* op, const char* kernel, int err) {
  ADARTS_CHECK(err == 0, op, "CUDA launch of ", kernel, " failed: ",
               cudaGetErrorString(static_cast<cudaError_t>(err)), " (error ", err, ")");
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// x: CUDA, 4-d, floating, contiguous, planes of at most 2^31 - 1 elements.
void check_x(const char* op, const at::Tensor& x) {
  validate_x(op, x, kCUDA);
  ADARTS_CHECK(x.size(2) * x.size(3) <= cuda::kMaxPlane && x.size(1) <= cuda::kMaxPlane, op,
               "the CUDA kernels take planes H*W and channel counts C below 2^31, got x of sizes ", x.sizes());
}

// ---------------------------------------------------------------------------- 1. scoring
constexpr const char* kScore = "attention_score";

void check_x_w(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  check_x(kScore, x);
  validate_score_weights(kScore, x, w1, w2, kCUDA);
  const int64_t C = x.size(1);
  // The MLP runs as 16x16-tiled GEMMs: rows (2B, C, C/2) are limited by the grid's y extent.
  const int64_t rows = 16 * 65535;
  ADARTS_CHECK(2 * x.size(0) <= rows && C <= rows && w1.size(0) <= rows, kScore,
               "the CUDA kernels take 2*B, C and the hidden size up to ", rows, ", got x of sizes ",
               x.sizes(), " and w1 of sizes ", w1.sizes());
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

// ---------------------------------------------------------------------------- 2. gather
constexpr const char* kGather = "attention_gather";

void check_x_a(const char* op, const at::Tensor& x, const at::Tensor& a) {
  check_x(op, x);
  validate_a(op, a, x, kCUDA);
}

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

// ---------------------------------------------------------------------------- 3. write-back
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

// ---------------------------------------------------------------------------- 4. mixed sum
constexpr const char* kMixed = "mixed_sum";

MixedSumDims check_mixed(at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights,
                         const at::Tensor& pool_weights, const std::optional<at::Tensor>& identity_weight,
                         int64_t stride, double eps) {
  const MixedSumDims d = validate_mixed_sum(kMixed, z, x, z_weights, pool_weights, identity_weight, stride, kCUDA);
  validate_mixed_sum_eps(kMixed, eps);
  ADARTS_CHECK(d.H * d.W <= cuda::kMaxPlane, kMixed, "the CUDA kernels take planes H*W below 2^31, got x of sizes ",
               x.sizes());
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
  m.impl("attention_score_fwd", &attention_score_fwd_cuda);
  m.impl("attention_score_bwd", &attention_score_bwd_cuda);
  m.impl("attention_gather_fwd", &attention_gather_fwd_cuda);
  m.impl("attention_gather_bwd", &attention_gather_bwd_cuda);
  m.impl("attention_writeback_fwd", &attention_writeback_fwd_cuda);
  m.impl("attention_writeback_bwd", &attention_writeback_bwd_cuda);
  m.impl("mixed_sum_fwd", &mixed_sum_fwd_cuda);
  m.impl("mixed_sum_bwd", &mixed_sum_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
