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
#include <vector>

// Generic: ADARTS_CHECK(cond, "attention_gather", "message parts", ...)
#define ADARTS_CHECK(cond, op, ...) TORCH_CHECK((cond), "adarts ", op, ": ", __VA_ARGS__)

#define CHECK_CPU(op, t)                                                                    \
  ADARTS_CHECK((t).device().is_cpu(), op, #t " must be a CPU tensor (this is the CPU "      \
               "kernel), got a tensor on ", (t).device())

#define CHECK_CONTIGUOUS(op, t)                                                             \
  ADARTS_CHECK((t).is_contiguous(), op, #t " must be contiguous (call .contiguous() "       \
               "first), got sizes ", (t).sizes(), " and strides ", (t).strides())

#define CHECK_DIM(op, t, d)                                                                 \
  ADARTS_CHECK((t).dim() == (d), op, #t " must be a ", (d), "-d tensor, got ", (t).dim(),   \
               "-d with sizes ", (t).sizes())

#define CHECK_SIZE(op, t, d, expected)                                                      \
  ADARTS_CHECK((t).size(d) == (expected), op, #t ".size(", (d), ") must be ", (expected),   \
               ", got sizes ", (t).sizes())

#define CHECK_SHAPE(op, t, ...)                                                             \
  ADARTS_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), op, #t " must have shape ",   \
               at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

#define CHECK_FLOATING(op, t)                                                               \
  ADARTS_CHECK(at::isFloatingType((t).scalar_type()), op, #t " must be a floating tensor "  \
               "(float16, bfloat16, float32 or float64), got ", (t).scalar_type())

#define CHECK_DTYPE(op, t, dt)                                                              \
  ADARTS_CHECK((t).scalar_type() == (dt), op, #t " must have dtype ", (dt), ", got ",       \
               (t).scalar_type())

#define CHECK_SAME_DTYPE(op, t, ref)                                                        \
  ADARTS_CHECK((t).scalar_type() == (ref).scalar_type(), op, #t " must have the dtype of "  \
               #ref " (", (ref).scalar_type(), "), got ", (t).scalar_type())

#define CHECK_SAME_DEVICE(op, t, ref)                                                       \
  ADARTS_CHECK((t).device() == (ref).device(), op, #t " must be on the device of " #ref     \
               " (", (ref).device(), "), got ", (t).device())

// A CPU, contiguous tensor of the dtype of `ref`, on ref's device.
#define CHECK_INPUT_LIKE(op, t, ref)                                                        \
  do {                                                                                      \
    CHECK_CPU(op, t);                                                                       \
    CHECK_SAME_DEVICE(op, t, ref);                                                          \
    CHECK_SAME_DTYPE(op, t, ref);                                                           \
    CHECK_CONTIGUOUS(op, t);                                                                \
  } while (0)

namespace adarts {

// Checks the selected-channel index `idx` (1-d, int64, CPU, contiguous, values distinct and
// in [0, C)) and returns the inverse map: sel[c] = j where idx[j] == c, -1 for channels that
// are not selected. O(n + C), done once per call before any kernel runs.
inline std::vector<int64_t> check_index(const char* op, const at::Tensor& idx, int64_t C) {
  CHECK_CPU(op, idx);
  CHECK_DIM(op, idx, 1);
  ADARTS_CHECK(idx.scalar_type() == at::kLong, op, "idx must be an int64 tensor, got ",
               idx.scalar_type());
  CHECK_CONTIGUOUS(op, idx);
  const int64_t n = idx.size(0);
  ADARTS_CHECK(n <= C, op, "idx selects ", n, " channels, more than the C = ", C,
               " channels of x");
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
