// Argument validation of the adarts_C operators, shared by the CPU kernels (csrc/cpu/*.cpp)
// and the CUDA bindings (csrc/cuda/<op>_binding.cpp).
//
// First the check macros and functions: every one takes the operator's short name first
// (e.g. "attention_gather") and raises c10::Error (RuntimeError in Python) through
// TORCH_CHECK, with a message of the form
//   "adarts <op>: <what> <expected>, got <actual>"
// so that a wrong call always ends in a readable exception, never in an out-of-bounds access.
//
// Then each operator's validation: every function takes the device type the kernel expects
// (c10::DeviceType::CPU or ::CUDA) and checks the shapes, dtypes, devices (that type, and x's
// device) and the layout of its operands. The backend-specific checks (idx values on the
// CPU, 32-bit size limits of the CUDA kernels) stay with the backends, which call these
// functions in their own order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

// Generic: ADARTS_CHECK(cond, "attention_gather", "message parts", ...)
#define ADARTS_CHECK(cond, op, ...) TORCH_CHECK((cond), "adarts ", op, ": ", __VA_ARGS__)

namespace adarts {

// Each check below names the tensor it looks at (`name`, e.g. "x") in its message; the
// CHECK_* macros pass the argument's spelling (#t) as the name.

// t is on a device of type `dev` ("x must be a CPU tensor (this is the CPU kernel), ...").
inline void check_device(const char* op, const char* name, const at::Tensor& t, c10::DeviceType dev) {
  const std::string dn = c10::DeviceTypeName(dev);
  ADARTS_CHECK(t.device().type() == dev, op, name, " must be a ", dn, " tensor (this is the ", dn,
               " kernel), got a tensor on ", t.device());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  ADARTS_CHECK(t.is_contiguous(), op, name, " must be contiguous (call .contiguous() first), got sizes ",
               t.sizes(), " and strides ", t.strides());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t d) {
  ADARTS_CHECK(t.dim() == d, op, name, " must be a ", d, "-d tensor, got ", t.dim(), "-d with sizes ",
               t.sizes());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t expected) {
  ADARTS_CHECK(t.size(d) == expected, op, name, ".size(", d, ") must be ", expected, ", got sizes ",
               t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape) {
  ADARTS_CHECK(t.sizes() == shape, op, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  ADARTS_CHECK(at::isFloatingType(t.scalar_type()), op, name,
               " must be a floating tensor (float16, bfloat16, float32 or float64), got ", t.scalar_type());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dt) {
  ADARTS_CHECK(t.scalar_type() == dt, op, name, " must have dtype ", dt, ", got ", t.scalar_type());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  ADARTS_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name, " (",
               ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  ADARTS_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name, " (",
               ref.device(), "), got ", t.device());
}

// t: on a `dev` device, on ref's device, of ref's dtype, contiguous (in this order).
inline void check_input_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref, c10::DeviceType dev) {
  check_device(op, name, t, dev);
  check_same_device(op, name, t, ref_name, ref);
  check_same_dtype(op, name, t, ref_name, ref);
  check_contiguous(op, name, t);
}

}  // namespace adarts

#define CHECK_CPU(op, t) ::adarts::check_device(op, #t, (t), c10::DeviceType::CPU)
#define CHECK_CONTIGUOUS(op, t) ::adarts::check_contiguous(op, #t, (t))
#define CHECK_DIM(op, t, d) ::adarts::check_dim(op, #t, (t), (d))
#define CHECK_SIZE(op, t, d, expected) ::adarts::check_size(op, #t, (t), (d), (expected))
#define CHECK_SHAPE(op, t, ...) ::adarts::check_shape(op, #t, (t), at::IntArrayRef({__VA_ARGS__}))
#define CHECK_FLOATING(op, t) ::adarts::check_floating(op, #t, (t))
#define CHECK_DTYPE(op, t, dt) ::adarts::check_dtype(op, #t, (t), (dt))
#define CHECK_SAME_DTYPE(op, t, ref) ::adarts::check_same_dtype(op, #t, (t), #ref, (ref))
#define CHECK_SAME_DEVICE(op, t, ref) ::adarts::check_same_device(op, #t, (t), #ref, (ref))
// A CPU, contiguous tensor of the dtype of `ref`, on ref's device.
#define CHECK_INPUT_LIKE(op, t, ref) ::adarts::check_input_like(op, #t, (t), #ref, (ref), c10::DeviceType::CPU)

namespace adarts {

// Checks the metadata of the selected-channel index `idx` for an x of C = x.size(1)
// channels: on a `dev` device and on x's device, 1-d, int64, contiguous, n <= C entries.
// Returns n. (The values are checked by check_index on the CPU; see csrc/cuda/*_binding.cpp
// for the CUDA side.)
inline int64_t check_idx(const char* op, const at::Tensor& idx, const at::Tensor& x, c10::DeviceType dev) {
  check_device(op, "idx", idx, dev);
  check_same_device(op, "idx", idx, "x", x);
  check_dim(op, "idx", idx, 1);
  ADARTS_CHECK(idx.scalar_type() == at::kLong, op, "idx must be an int64 tensor, got ",
               idx.scalar_type());
  check_contiguous(op, "idx", idx);
  const int64_t n = idx.size(0), C = x.size(1);
  ADARTS_CHECK(n <= C, op, "idx selects ", n, " channels, more than the C = ", C,
               " channels of x");
  return n;
}

// Checks the selected-channel index `idx` of a CPU x (check_idx, then values distinct and
// in [0, C), C = x.size(1)) and returns the inverse map: sel[c] = j where idx[j] == c, -1 for
// channels that are not selected. O(n + C), done once per call before any kernel runs.
inline std::vector<int64_t> check_index(const char* op, const at::Tensor& idx, const at::Tensor& x) {
  const int64_t n = check_idx(op, idx, x, c10::DeviceType::CPU);
  const int64_t C = x.size(1);
  std::vector<int64_t> sel(static_cast<size_t>(C), -1);
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t c = p[j];
    ADARTS_CHECK(c >= 0 && c < C, op, "idx[", j, "] = ", c, " is out of range [0, ", C, ")");
    ADARTS_CHECK(sel[static_cast<size_t>(c)] < 0, op, "idx must not repeat a channel: idx[",
                 sel[static_cast<size_t>(c)], "] = idx[", j, "] = ", c);
    sel[static_cast<size_t>(c)] = j;
  }
  return sel;
}

// ---------------------------------------------------------------------------- shared operands

// x: on a `dev` device, 4-d, floating, contiguous.
inline void validate_x(const char* op, const at::Tensor& x, c10::DeviceType dev) {
  check_device(op, "x", x, dev);
  check_dim(op, "x", x, 4);
  check_floating(op, "x", x);
  check_contiguous(op, "x", x);
}

// a: like x (device, dtype, contiguous), of shape (B, C).
inline void validate_a(const char* op, const at::Tensor& a, const at::Tensor& x, c10::DeviceType dev) {
  check_input_like(op, "a", a, "x", x, dev);
  ADARTS_CHECK(a.dim() == 2 && a.size(0) == x.size(0) && a.size(1) == x.size(1), op,
               "a must have shape (B, C) = (", x.size(0), ", ", x.size(1), "), got ", a.sizes());
}

// ---------------------------------------------------------------------------- scoring
// x (already checked by validate_x) has non-empty planes; w1: (R, C), w2: (C, R), like x.
inline void validate_score_weights(const char* op, const at::Tensor& x, const at::Tensor& w1,
                                   const at::Tensor& w2, c10::DeviceType dev) {
  ADARTS_CHECK(x.size(2) > 0 && x.size(3) > 0, op,
               "x must have non-empty planes (H, W >= 1) for the global pools, got sizes ", x.sizes());
  const int64_t C = x.size(1);
  check_input_like(op, "w1", w1, "x", x, dev);
  check_input_like(op, "w2", w2, "x", x, dev);
  check_dim(op, "w1", w1, 2);
  check_dim(op, "w2", w2, 2);
  ADARTS_CHECK(w1.size(1) == C, op, "w1 must have shape (C/2, C) = (", C / 2, ", ", C,
               ") for x with C = ", C, " channels, got ", w1.sizes());
  ADARTS_CHECK(w2.size(0) == C && w2.size(1) == w1.size(0), op,
               "w2 must have shape (C, w1.size(0)) = (", C, ", ", w1.size(0), "), got ", w2.sizes());
}

inline void validate_n_select(const char* op, int64_t n_select, const at::Tensor& x) {
  const int64_t C = x.size(1);
  ADARTS_CHECK(n_select >= 1 && n_select <= C, op, "n_select must be in [1, C] = [1, ", C, "], got ",
               n_select);
}

// Backward: a and grad_a like x, of shape (B, C).
inline void validate_score_bwd(const char* op, const at::Tensor& grad_a, const at::Tensor& a,
                               const at::Tensor& x, c10::DeviceType dev) {
  const int64_t B = x.size(0), C = x.size(1);
  check_input_like(op, "a", a, "x", x, dev);
  check_input_like(op, "grad_a", grad_a, "x", x, dev);
  check_shape(op, "a", a, {B, C});
  check_shape(op, "grad_a", grad_a, {B, C});
}

// ---------------------------------------------------------------------------- gather
// Backward: grad like x, of shape (B, n, H, W).
inline void validate_gather_grad(const char* op, const at::Tensor& grad, const at::Tensor& x, int64_t n,
                                 c10::DeviceType dev) {
  check_input_like(op, "grad", grad, "x", x, dev);
  check_shape(op, "grad", grad, {x.size(0), n, x.size(2), x.size(3)});
}

// ---------------------------------------------------------------------------- write-back
struct WritebackDims {
  int64_t B, C, H, W, Ho, Wo, n;
};

inline void validate_stride(const char* op, int64_t stride) {
  ADARTS_CHECK(stride == 1 || stride == 2, op, "stride must be 1 or 2, got ", stride);
}

// Sizes of x (already checked by validate_x) and of the output for `stride` (already checked
// by validate_stride); stride 2 needs even H and W. n is left 0.
inline WritebackDims writeback_dims(const char* op, const at::Tensor& x, int64_t stride) {
  WritebackDims d{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 0};
  if (stride == 2) {
    ADARTS_CHECK(d.H % 2 == 0 && d.W % 2 == 0, op,
                 "stride 2 needs even H and W (2x2 max pooling), got x of sizes ", x.sizes());
  }
  d.Ho = d.H / stride;
  d.Wo = d.W / stride;
  return d;
}

// y like x, of shape (B, n, Ho, Wo); beta (optional): on a `dev` device and x's, x's dtype, one element.
inline void validate_writeback_y_beta(const char* op, const at::Tensor& x, const at::Tensor& y,
                                      const std::optional<at::Tensor>& beta, const WritebackDims& d,
                                      int64_t stride, c10::DeviceType dev) {
  check_input_like(op, "y", y, "x", x, dev);
  ADARTS_CHECK(y.sizes() == at::IntArrayRef({d.B, d.n, d.Ho, d.Wo}), op,
               "y must have shape (B, n, H/stride, W/stride) = (", d.B, ", ", d.n, ", ", d.Ho, ", ", d.Wo,
               ") for stride ", stride, ", got ", y.sizes());
  if (beta.has_value()) {
    const at::Tensor& bt = *beta;
    check_device(op, "bt", bt, dev);
    check_same_device(op, "bt", bt, "x", x);  // always true for two CPU tensors
    check_same_dtype(op, "bt", bt, "x", x);
    ADARTS_CHECK(bt.numel() == 1, op, "beta must be a 0-dim (one element) tensor, got sizes ", bt.sizes());
  }
}

// Backward: grad like x, of the output's shape (B, C, Ho, Wo).
inline void validate_writeback_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                    const WritebackDims& d, c10::DeviceType dev) {
  check_input_like(op, "grad", grad, "x", x, dev);
  ADARTS_CHECK(grad.sizes() == at::IntArrayRef({d.B, d.C, d.Ho, d.Wo}), op,
               "grad must have the output's shape (B, C, H/stride, W/stride) = (", d.B, ", ", d.C, ", ", d.Ho,
               ", ", d.Wo, "), got ", grad.sizes());
}

// ---------------------------------------------------------------------------- mixed sum
// Operands (see adarts_kernels/ops/reference.py, mixed_sum_fwd / mixed_sum_bwd):
//   x: (B, n, H, W), H, W >= 1, even at stride 2;  z: P tensors (B, n, H/s, W/s), any
//   0 <= P <= kMixedSumMaxZ;  z_weights: (P,);  pool_weights: (2,);  identity_weight
//   (optional): 0-dim, stride 1 only;  all of x's dtype and device, contiguous.
//   Statistics (mean, var, run_mean, run_var): (Q, n) with Q = P + 2.
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
