// CUDA implementations of the adarts_C operators (schemas in csrc/adarts.cpp): argument
// checks, output allocation, and calls of the launchers of csrc/cuda/*.cu (kernels.h).
//
// Compiled only into a CUDA build of the extension (WITH_CUDA defined, torch built with
// CUDA); everything below is guarded so that a CPU build may list this file harmlessly.
//
// The checks mirror the CPU kernels' (csrc/cpu/*.cpp, csrc/checks.h), with "CUDA tensor on
// x's device" in place of "CPU tensor". One difference: idx's *values* (in [0, C), distinct)
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

#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace adarts {
namespace {

#define ADARTS_CHECK_CUDA(op, t)                                                            \
  ADARTS_CHECK((t).is_cuda(), op, #t " must be a CUDA tensor (this is the CUDA kernel), "   \
               "got a tensor on ", (t).device())

// A CUDA, contiguous tensor of the dtype of `ref`, on ref's device.
#define ADARTS_CHECK_CUDA_INPUT_LIKE(op, t, ref)                                                   \
  do {                                                                                      \
    ADARTS_CHECK_CUDA(op, t);                                                               \
    CHECK_SAME_DEVICE(op, t, ref);                                                          \
    CHECK_SAME_DTYPE(op, t, ref);                                                           \
    CHECK_CONTIGUOUS(op, t);                                                                \
  } while (0)

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
  ADARTS_CHECK_CUDA(op, x);
  CHECK_DIM(op, x, 4);
  CHECK_FLOATING(op, x);
  CHECK_CONTIGUOUS(op, x);
  ADARTS_CHECK(x.size(2) * x.size(3) <= cuda::kMaxPlane && x.size(1) <= cuda::kMaxPlane, op,
               "the CUDA kernels take planes H*W and channel counts C below 2^31, got x of sizes ", x.sizes());
}

// idx: 1-d int64 contiguous CUDA tensor on x's device with n <= C entries (values: see top).
int64_t check_idx(const char* op, const at::Tensor& idx, const at::Tensor& x) {
  ADARTS_CHECK_CUDA(op, idx);
  CHECK_SAME_DEVICE(op, idx, x);
  CHECK_DIM(op, idx, 1);
  ADARTS_CHECK(idx.scalar_type() == at::kLong, op, "idx must be an int64 tensor, got ", idx.scalar_type());
  CHECK_CONTIGUOUS(op, idx);
  const int64_t n = idx.size(0), C = x.size(1);
  ADARTS_CHECK(n <= C, op, "idx selects ", n, " channels, more than the C = ", C, " channels of x");
  return n;
}

// ---------------------------------------------------------------------------- 1. scoring
constexpr const char* kScore = "attention_score";

void check_x_w(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  check_x(kScore, x);
  ADARTS_CHECK(x.size(2) > 0 && x.size(3) > 0, kScore,
               "x must have non-empty planes (H, W >= 1) for the global pools, got sizes ", x.sizes());
  const int64_t C = x.size(1);
  ADARTS_CHECK_CUDA_INPUT_LIKE(kScore, w1, x);
  ADARTS_CHECK_CUDA_INPUT_LIKE(kScore, w2, x);
  CHECK_DIM(kScore, w1, 2);
  CHECK_DIM(kScore, w2, 2);
  ADARTS_CHECK(w1.size(1) == C, kScore, "w1 must have shape (C/2, C) = (", C / 2, ", ", C,
               ") for x with C = ", C, " channels, got ", w1.sizes());
  ADARTS_CHECK(w2.size(0) == C && w2.size(1) == w1.size(0), kScore,
               "w2 must have shape (C, w1.size(0)) = (", C, ", ", w1.size(0), "), got ", w2.sizes());
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
  ADARTS_CHECK(n_select >= 1 && n_select <= C, kScore, "n_select must be in [1, C] = [1, ", C, "], got ",
               n_select);
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
  ADARTS_CHECK_CUDA_INPUT_LIKE(kScore, a, x);
  ADARTS_CHECK_CUDA_INPUT_LIKE(kScore, grad_a, x);
  CHECK_SHAPE(kScore, a, B, C);
  CHECK_SHAPE(kScore, grad_a, B, C);
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
  ADARTS_CHECK_CUDA_INPUT_LIKE(op, a, x);
  ADARTS_CHECK(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == x.size(1), op,
               "a must have shape (B, C) = (", x.size(0), ", ", x.size(1), "), got ", a.sizes());
}

at::Tensor attention_gather_fwd_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx) {
  check_x_a(kGather, x, a);
  const int64_t n = check_idx(kGather, idx, x);
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
  const int64_t n = check_idx(kGather, idx, x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  ADARTS_CHECK_CUDA_INPUT_LIKE(kGather, grad, x);
  CHECK_SHAPE(kGather, grad, B, n, H, W);
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

struct Dims {
  int64_t B, C, H, W, Ho, Wo, n;
};

Dims check_writeback(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx, const at::Tensor& y,
                     const std::optional<at::Tensor>& beta, int64_t stride) {
  ADARTS_CHECK(stride == 1 || stride == 2, kWriteback, "stride must be 1 or 2, got ", stride);
  check_x_a(kWriteback, x, a);
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 0};
  if (stride == 2) {
    ADARTS_CHECK(d.H % 2 == 0 && d.W % 2 == 0, kWriteback,
                 "stride 2 needs even H and W (2x2 max pooling), got x of sizes ", x.sizes());
  }
  d.Ho = d.H / stride;
  d.Wo = d.W / stride;
  d.n = check_idx(kWriteback, idx, x);
  ADARTS_CHECK_CUDA_INPUT_LIKE(kWriteback, y, x);
  ADARTS_CHECK(y.sizes() == at::IntArrayRef({d.B, d.n, d.Ho, d.Wo}), kWriteback,
               "y must have shape (B, n, H/stride, W/stride) = (", d.B, ", ", d.n, ", ", d.Ho, ", ", d.Wo,
               ") for stride ", stride, ", got ", y.sizes());
  if (beta.has_value()) {
    const at::Tensor& bt = *beta;
    ADARTS_CHECK_CUDA(kWriteback, bt);
    CHECK_SAME_DEVICE(kWriteback, bt, x);
    CHECK_SAME_DTYPE(kWriteback, bt, x);
    ADARTS_CHECK(bt.numel() == 1, kWriteback, "beta must be a 0-dim (one element) tensor, got sizes ", bt.sizes());
  }
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
  ADARTS_CHECK_CUDA_INPUT_LIKE(kWriteback, grad, x);
  ADARTS_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.C, d.Ho, d.Wo}), kWriteback,
               "grad must have the output's shape (B, C, H/stride, W/stride) = (", d.B, ", ", d.C, ", ", d.Ho,
               ", ", d.Wo, "), got ", grad.sizes());
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
  m.impl("attention_score_fwd", &attention_score_fwd_cuda);
  m.impl("attention_score_bwd", &attention_score_bwd_cuda);
  m.impl("attention_gather_fwd", &attention_gather_fwd_cuda);
  m.impl("attention_gather_bwd", &attention_gather_bwd_cuda);
  m.impl("attention_writeback_fwd", &attention_writeback_fwd_cuda);
  m.impl("attention_writeback_bwd", &attention_writeback_bwd_cuda);
}

}  // namespace adarts

#endif  // WITH_CUDA
