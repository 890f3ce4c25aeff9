// Reduction helpers of the CPU kernels (csrc/cpu/*_kernel.cpp), in one place: the
// at::parallel_for grain and the deterministic blocked sum.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

namespace adarts {

// Work items (planes) per at::parallel_for chunk: about GRAIN_SIZE elements of work.
inline int64_t plane_grain(int64_t plane_elems) {
  const int64_t per = plane_elems > 0 ? plane_elems : 1;
  const int64_t g = at::internal::GRAIN_SIZE / per;
  return g > 0 ? g : 1;
}

// Sum of f(i) for i in [0, n), accumulated in acc_t: eight interleaved partial sums (term i
// goes to lane i % 8) over blocks of 512 terms, the blocks added in order. Deterministic (no
// dependence on the thread count), and its rounding error grows far more slowly than a
// single running sum's. f is called exactly once per i, in increasing order; the eight lanes
// are written as an inner loop that the compiler vectorises when f has no side effects.
template <typename acc_t, typename F>
inline acc_t blocked_sum(int64_t n, F&& f) {
  constexpr int64_t kBlock = 512;
  acc_t total = acc_t(0);
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = n < start + kBlock ? n : start + kBlock;
    acc_t lane[8] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
      for (int j = 0; j < 8; ++j) lane[j] += f(i + j);
    }
    for (; i < end; ++i) lane[i & 7] += f(i);
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  return total;
}

}  // namespace adarts
