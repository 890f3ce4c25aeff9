// Argument validation of the adarts_C operators, shared by the CPU kernels (csrc/cpu/*.cpp)
// and the CUDA bindings (csrc/cuda/bindings.cpp).
//
// Every function takes the device type the kernel expects (c10::DeviceType::CPU or ::CUDA)
// and checks the shapes, dtypes, devices (that type, and x's device) and the layout of its
// operands, with the messages of csrc/checks.h ("adarts <op>: ..."). The backend-specific
// checks (idx values on the CPU, 32-bit size limits of the CUDA kernels) stay with the
// backends, which call these functions in their own order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "checks.h"

namespace adarts {

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

}  // namespace adarts
