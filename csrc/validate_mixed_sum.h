// Argument validation of adarts_C::mixed_sum_fwd / mixed_sum_bwd, shared by the CPU kernel
// (csrc/cpu/mixed_sum_kernel.cpp) and the CUDA binding (csrc/cuda/bindings.cpp).
//
// Same conventions as csrc/validate.h: every function takes the device type the kernel
// expects and raises "adarts mixed_sum: ..." (c10::Error, RuntimeError in Python) for a
// wrong call, before any kernel runs.
//
// Operands (see adarts_kernels/ops/reference.py, mixed_sum_fwd / mixed_sum_bwd):
//   x: (B, n, H, W), H, W >= 1, even at stride 2;  z: P tensors (B, n, H/s, W/s), any
//   0 <= P <= kMixedSumMaxZ;  z_weights: (P,);  pool_weights: (2,);  identity_weight
//   (optional): 0-dim, stride 1 only;  all of x's dtype and device, contiguous.
//   Statistics (mean, var, run_mean, run_var): (Q, n) with Q = P + 2.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "validate.h"

namespace adarts {

// The most z inputs one call takes (the CUDA kernels hold the pointers in fixed arrays).
constexpr int64_t kMixedSumMaxZ = 5;

struct MixedSumDims {
  int64_t B, n, H, W, Ho, Wo;
  int64_t stride, P, Q;
  bool identity;  // the identity term identity_weight * x is present
};

// Checks stride, x, z and the weights; returns the sizes.
inline MixedSumDims validate_mixed_sum(const char* op, at::TensorList z, const at::Tensor& x,
                                       const at::Tensor& z_weights, const at::Tensor& pool_weights,
                                       const std::optional<at::Tensor>& identity_weight, int64_t stride,
                                       c10::DeviceType dev) {
  validate_stride(op, stride);
  validate_x(op, x, dev);
  const int64_t P = static_cast<int64_t>(z.size());
  MixedSumDims d{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, stride, P, P + 2, identity_weight.has_value()};
  ADARTS_CHECK(d.H >= 1 && d.W >= 1, op, "x must have non-empty planes (H, W >= 1) for the 3x3 pools, got sizes ",
               x.sizes());
  if (stride == 2) {
    ADARTS_CHECK(d.H % 2 == 0 && d.W % 2 == 0, op, "stride 2 needs even H and W, got x of sizes ", x.sizes());
  }
  d.Ho = d.H / stride;
  d.Wo = d.W / stride;
  ADARTS_CHECK(P <= kMixedSumMaxZ, op, "z may hold at most ", kMixedSumMaxZ, " tensors, got ", P);
  for (size_t i = 0; i < z.size(); ++i) {
    const std::string name = "z[" + std::to_string(i) + "]";
    check_input_like(op, name.c_str(), z[i], "x", x, dev);
    ADARTS_CHECK(z[i].sizes() == at::IntArrayRef({d.B, d.n, d.Ho, d.Wo}), op, name,
                 " must have shape (B, n, H/stride, W/stride) = (", d.B, ", ", d.n, ", ", d.Ho, ", ", d.Wo,
                 ") for stride ", stride, ", got ", z[i].sizes());
  }
  check_input_like(op, "z_weights", z_weights, "x", x, dev);
  ADARTS_CHECK(z_weights.dim() == 1 && z_weights.size(0) == P, op,
               "z_weights must have shape (P,) = (", P, ",) (one weight per z), got ", z_weights.sizes());
  check_input_like(op, "pool_weights", pool_weights, "x", x, dev);
  ADARTS_CHECK(pool_weights.dim() == 1 && pool_weights.size(0) == 2, op,
               "pool_weights must have shape (2,) (max pool, avg pool), got ", pool_weights.sizes());
  if (identity_weight.has_value()) {
    ADARTS_CHECK(stride == 1, op, "identity_weight must be absent at stride 2 (the identity exists at stride 1 only)");
    check_input_like(op, "identity_weight", *identity_weight, "x", x, dev);
    ADARTS_CHECK(identity_weight->dim() == 0, op, "identity_weight must be a 0-dim tensor, got sizes ",
                 identity_weight->sizes());
  }
  return d;
}

inline void validate_mixed_sum_eps(const char* op, double eps) {
  ADARTS_CHECK(eps > 0.0, op, "eps must be positive, got ", eps);
}

// The dtype of the statistics: float32 for float16 / bfloat16 x, x's dtype otherwise.
inline at::ScalarType mixed_sum_stats_dtype(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Forward, eval mode: run_mean and run_var both given or both absent; when given, floating,
// on x's device (any floating dtype: they are converted to the statistics dtype), (Q, n).
inline void validate_mixed_sum_running(const char* op, const std::optional<at::Tensor>& run_mean,
                                       const std::optional<at::Tensor>& run_var, const at::Tensor& x,
                                       const MixedSumDims& d, c10::DeviceType dev) {
  ADARTS_CHECK(run_mean.has_value() == run_var.has_value(), op,
               "give both run_mean and run_var (eval) or neither (training), got ",
               run_mean.has_value() ? "run_mean only" : "run_var only");
  if (!run_mean.has_value()) return;
  const std::pair<const char*, const at::Tensor*> stats[2] = {{"run_mean", &*run_mean}, {"run_var", &*run_var}};
  for (const auto& s : stats) {
    check_device(op, s.first, *s.second, dev);
    check_same_device(op, s.first, *s.second, "x", x);
    check_floating(op, s.first, *s.second);
    ADARTS_CHECK(s.second->sizes() == at::IntArrayRef({d.Q, d.n}), op, s.first, " must have shape (Q, n) = (",
                 d.Q, ", ", d.n, ") for stride ", d.stride, ", got ", s.second->sizes());
  }
}

// Backward: grad like x of the output's shape (B, n, H/s, W/s); mean, var: on x's device,
// of the statistics dtype, (Q, n), contiguous.
inline void validate_mixed_sum_bwd(const char* op, const at::Tensor& grad, const at::Tensor& mean,
                                   const at::Tensor& var, const at::Tensor& x, const MixedSumDims& d,
                                   c10::DeviceType dev) {
  check_input_like(op, "grad", grad, "x", x, dev);
  ADARTS_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.n, d.Ho, d.Wo}), op,
               "grad must have the output's shape (B, n, H/stride, W/stride) = (", d.B, ", ", d.n, ", ", d.Ho,
               ", ", d.Wo, "), got ", grad.sizes());
  const at::ScalarType st = mixed_sum_stats_dtype(x);
  const std::pair<const char*, const at::Tensor*> stats[2] = {{"mean", &mean}, {"var", &var}};
  for (const auto& s : stats) {
    check_device(op, s.first, *s.second, dev);
    check_same_device(op, s.first, *s.second, "x", x);
    ADARTS_CHECK(s.second->scalar_type() == st, op, s.first, " must have the statistics dtype ", st,
                 " (float32 for float16/bfloat16 x, x's dtype otherwise), got ", s.second->scalar_type());
    ADARTS_CHECK(s.second->sizes() == at::IntArrayRef({d.Q, d.n}), op, s.first, " must have shape (Q, n) = (",
                 d.Q, ", ", d.n, ") for stride ", d.stride, ", got ", s.second->sizes());
    check_contiguous(op, s.first, *s.second);
  }
}

}  // namespace adarts
