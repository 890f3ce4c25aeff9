// Argument checks shared by the adarts_C operators.
//
// Every macro takes the operator's short name first (e.g. "attention_gather") and raises
// c10::Error (RuntimeError in Python) through TORCH_CHECK, with a message of the form
//   "adarts <op>: <what> <expected>, got <actual>"
// so that a wrong call always ends in a readable exception, never in an out-of-bounds access.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <string>
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
// Returns n. (The values are checked by check_index on the CPU; see csrc/cuda/bindings.cpp
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

// Work items (planes) per at::parallel_for chunk: about GRAIN_SIZE elements of work.
inline int64_t plane_grain(int64_t plane_elems) {
  const int64_t per = plane_elems > 0 ? plane_elems : 1;
  const int64_t g = at::internal::GRAIN_SIZE / per;
  return g > 0 ? g : 1;
}

// Sum of f(i) for i in [0, n), accumulated in acc_t: eight interleaved partial sums over
// blocks of 512 terms, the blocks added in order. Deterministic (no dependence on the
// thread count), and its rounding error grows far more slowly than a single running sum's.
// f is called exactly once per i, in increasing order (it may have side effects).
template <typename acc_t, typename F>
inline acc_t blocked_sum(int64_t n, F&& f) {
  constexpr int64_t kBlock = 512;
  acc_t total = acc_t(0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = n < start + kBlock ? n : start + kBlock;
    acc_t lane[8] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0),
                     acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = start; i < end; ++i) {
      lane[i & 7] += f(i);
    }
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  return total;
}

}  // namespace adarts
