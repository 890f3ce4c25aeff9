// CPU kernels of adarts_C::attention_score_fwd / attention_score_bwd.
//
// Specification: adarts_kernels/ops/reference.py (attention_pools, attention_score_fwd,
// attention_score_bwd). x: (B, C, H, W), w1: (R, C), w2: (C, R) (R = C/2 in ADARTS),
// a: (B, C). Everything is computed in at::opmath_type<scalar_t> (float for half and
// bfloat16, the input type otherwise) and rounded to the input dtype on output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "../validate.h"
#include "reduce.h"

namespace adarts {
namespace {

constexpr const char* kOp = "attention_score";

// Global average and first maximum of one contiguous plane of n >= 1 elements.
// The maximum is the first one in row-major order; a NaN becomes the maximum and the first
// NaN is kept, as torch.max(dim) does.
//
// Written so that GCC -O3 vectorises it (SSE2 baseline, no -march): one branch-free pass
// keeps 8 partial sums and 8 partial maxima (NaN ignored by the '>' compare), then a short
// scalar scan finds the first position holding the maximum (the plane is in L1 by then).
// A NaN in the plane makes the sum NaN, so the NaN search only runs when the sum is NaN.
// The sum is the same as before, bit for bit: lane i & 7 over blocks of 512 terms, lanes
// combined pairwise per block, blocks added in order.
// Measured (2 threads, float32): the old one-pass branchy loop (not vectorised) made the
// forward 2.6 ms at 256x16x32x32 and 1.9 ms at 256x64x8x8 vs the reference's 1.5 / 0.8 ms;
// with this loop, the at::mm MLP and OpenMP (setup.py) it is 0.63 / 0.36 ms.
template <typename scalar_t, typename acc_t>
inline void pool_plane(const scalar_t* p, int64_t n, acc_t& avg, acc_t& mx, int64_t& arg) {
  constexpr int64_t kBlock = 512;
  constexpr int kL = 8;
  acc_t total = acc_t(0);
  acc_t mlane[kL];
#if defined(__GNUC__)
  // GCC/Clang vector extension, native 16-byte vectors (SSE2 baseline): lanes 0-7 are
  // kN = 8 / kV registers. The plain-array form (#else) is not vectorised by GCC -O3
  // (-fopt-info-vec); a 32-byte vector type on SSE2 was lowered badly (fwd 4.6 ms at
  // 256x16x32x32). Standalone: this loop pools 4M floats in ~1.0 ms on one thread.
  constexpr int kV = 16 / sizeof(acc_t) < kL ? 16 / sizeof(acc_t) : kL;
  constexpr int kN = kL / kV;
  typedef acc_t vec_t __attribute__((vector_size(kV * sizeof(acc_t))));
  vec_t vmax[kN];
  for (int k = 0; k < kN; ++k) vmax[k] = vec_t{} - std::numeric_limits<acc_t>::infinity();
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    vec_t vsum[kN];
    for (int k = 0; k < kN; ++k) vsum[k] = vec_t{};
    int64_t i = start;
    for (; i + kL <= end; i += kL) {
      for (int k = 0; k < kN; ++k) {
        acc_t tmp[kV];
        for (int j = 0; j < kV; ++j) tmp[j] = static_cast<acc_t>(p[i + k * kV + j]);
        vec_t v;
        std::memcpy(&v, tmp, sizeof(v));
        vsum[k] += v;
        vmax[k] = v > vmax[k] ? v : vmax[k];
      }
    }
    acc_t lane[kL];
    acc_t ml[kL];
    std::memcpy(lane, vsum, sizeof(lane));
    std::memcpy(ml, vmax, sizeof(ml));
    for (; i < end; ++i) {
      const acc_t v = static_cast<acc_t>(p[i]);
      lane[i & 7] += v;
      ml[i & 7] = v > ml[i & 7] ? v : ml[i & 7];
    }
    std::memcpy(vmax, ml, sizeof(ml));
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  std::memcpy(mlane, vmax, sizeof(mlane));
#else
  for (int j = 0; j < kL; ++j) mlane[j] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    acc_t lane[kL] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0),
                      acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = start; i < end; ++i) {
      const acc_t v = static_cast<acc_t>(p[i]);
      lane[i & 7] += v;
      mlane[i & 7] = v > mlane[i & 7] ? v : mlane[i & 7];
    }
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
#endif
  int64_t am = -1;
  if (std::isnan(total)) {  // a NaN in the plane (or inf - inf): the first NaN, if any
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(static_cast<acc_t>(p[i]))) {
        am = i;
        break;
      }
    }
  }
  if (am < 0) {
    acc_t m = mlane[0];
    for (int j = 1; j < kL; ++j) m = mlane[j] > m ? mlane[j] : m;
    am = 0;
    while (static_cast<acc_t>(p[am]) != m) ++am;  // m is one of the values: always found
  }
  avg = total / static_cast<acc_t>(n);
  mx = static_cast<acc_t>(p[am]);
  arg = am;
}

// Pools of all B*C planes of a contiguous x: avg[i], mx[i], arg[i] for plane i.
template <typename scalar_t, typename acc_t>
void pool_all(const scalar_t* x, int64_t planes, int64_t hw, acc_t* avg, acc_t* mx, int64_t* arg) {
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      pool_plane<scalar_t, acc_t>(x + i * hw, hw, avg[i], mx[i], arg[i]);
    }
  });
}

// The pools as one (2B, C) matrix in acc_t: rows [0, B) the averages, rows [B, 2B) the
// maxima, so that both go through the MLP's first layer in one at::mm; arg: (B*C).
template <typename scalar_t, typename acc_t>
at::Tensor pools(const at::Tensor& x, int64_t B, int64_t C, int64_t HW, int64_t* arg) {
  at::Tensor P = at::empty({2 * B, C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* pp = P.data_ptr<acc_t>();
  pool_all<scalar_t, acc_t>(x.data_ptr<scalar_t>(), B * C, HW, pp, pp + B * C, arg);
  return P;
}

// h = relu(P @ w1f.T): (2B, R). at::mm (BLAS) instead of the former naive loops: the two
// MLP layers were most of the backward's 5.4 ms at 256x64x8x8 (reference 1.7 ms). relu
// keeps NaN, as torch's.
inline at::Tensor hidden(const at::Tensor& P, const at::Tensor& w1f) {
  at::Tensor h = at::mm(P, w1f.t());
  at::relu_(h);
  return h;
}

void check_x_w(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  validate_x(kOp, x, c10::DeviceType::CPU);
  validate_score_weights(kOp, x, w1, w2, c10::DeviceType::CPU);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_score_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                           const at::Tensor& w2, int64_t n_select) {
  check_x_w(x, w1, w2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), R = w1.size(0);
  validate_n_select(kOp, n_select, x);

  at::Tensor a = at::empty({B, C}, x.options());
  at::Tensor idx = at::empty({n_select}, x.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_score_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const size_t BC = static_cast<size_t>(B * C);
    std::vector<int64_t> arg(BC);
    const at::Tensor P = pools<scalar_t, acc_t>(x, B, C, HW, arg.data());
    const at::Tensor h = hidden(P, w1.to(acc_type)).contiguous();
    const acc_t* hp = h.data_ptr<acc_t>();

    // z[b, c] = w2[c] . h_avg[b] + w2[c] . h_mx[b], vectorised over c with w2 transposed
    // (R, C), every column by the same operations in the same order (r ascending): two
    // channels with equal inputs and w2 rows get bitwise-equal a, which a BLAS matmul does
    // not promise (test_score_ties_pairs). Kept as a loop; the first layer is at::mm.
    const at::Tensor w2t = w2.to(acc_type).t().contiguous();
    const acc_t* w2tp = w2t.data_ptr<acc_t>();
    std::vector<acc_t> af(BC);
    at::parallel_for(0, B, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C * R)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> za(static_cast<size_t>(C)), zm(static_cast<size_t>(C));
      for (int64_t b = begin; b < end; ++b) {
        std::fill(za.begin(), za.end(), acc_t(0));
        std::fill(zm.begin(), zm.end(), acc_t(0));
        const acc_t* ha = hp + b * R;
        const acc_t* hm = hp + (B + b) * R;
        for (int64_t r = 0; r < R; ++r) {
          const acc_t* wr = w2tp + r * C;
          const acc_t va = ha[r], vm = hm[r];
          for (int64_t c = 0; c < C; ++c) {
            za[c] += wr[c] * va;
            zm[c] += wr[c] * vm;
          }
        }
        acc_t* ab = af.data() + b * C;
        for (int64_t c = 0; c < C; ++c) ab[c] = acc_t(1) / (acc_t(1) + std::exp(-(za[c] + zm[c])));
      }
    });

    scalar_t* ap = a.data_ptr<scalar_t>();
    for (size_t i = 0; i < BC; ++i) ap[i] = static_cast<scalar_t>(af[i]);

    // Batch-summed score (unrounded a, as the reference), then the top n_select channels:
    // descending score, equal scores by lower channel index, NaN ranked first (torch.sort).
    std::vector<acc_t> score(static_cast<size_t>(C), acc_t(0));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < C; ++c) score[c] += af[b * C + c];
    }
    std::vector<int64_t> order(static_cast<size_t>(C));
    std::iota(order.begin(), order.end(), int64_t(0));
    auto before = [&](int64_t i, int64_t j) {
      const acc_t si = score[i], sj = score[j];
      const bool ni = std::isnan(si), nj = std::isnan(sj);
      if (ni != nj) return ni;
      if (!ni && si != sj) return si > sj;
      return i < j;
    };
    std::partial_sort(order.begin(), order.begin() + n_select, order.end(), before);
    std::copy(order.begin(), order.begin() + n_select, idx.data_ptr<int64_t>());
  });
  return {a, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_score_bwd_cpu(const at::Tensor& grad_a,
                                                                       const at::Tensor& x,
                                                                       const at::Tensor& w1,
                                                                       const at::Tensor& w2,
                                                                       const at::Tensor& a) {
  check_x_w(x, w1, w2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), R = w1.size(0);
  validate_score_bwd(kOp, grad_a, a, x, c10::DeviceType::CPU);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw1 = at::empty(w1.sizes(), w1.options());
  at::Tensor dw2 = at::empty(w2.sizes(), w2.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_score_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const size_t BC = static_cast<size_t>(B * C);
    std::vector<int64_t> arg(BC);
    const at::Tensor P = pools<scalar_t, acc_t>(x, B, C, HW, arg.data());  // [avg; mx]: (2B, C)
    const at::Tensor w1f = w1.to(acc_type), w2f = w2.to(acc_type);
    const at::Tensor h = hidden(P, w1f).contiguous();                       // [h_avg; h_mx]: (2B, R)

    // dz = grad_a * a * (1 - a): (B, C).
    at::Tensor dz = at::empty({B, C}, P.options());
    {
      const scalar_t* gp = grad_a.data_ptr<scalar_t>();
      const scalar_t* ap = a.data_ptr<scalar_t>();
      acc_t* dzp = dz.data_ptr<acc_t>();
      for (size_t i = 0; i < BC; ++i) {
        const acc_t av = static_cast<acc_t>(ap[i]);
        dzp[i] = static_cast<acc_t>(gp[i]) * av * (acc_t(1) - av);
      }
    }
    // The MLP's gradients as at::mm on the (B, C) / (2B, R) matrices (was: naive loops with
    // strided inner products, ~3.5 ms of the 5.4 ms fwd+bwd at 256x64x8x8).
    // dw2 = dz.T @ (h_avg + h_mx): (C, R).
    dw2.copy_(at::mm(dz.t(), h.narrow(0, 0, B) + h.narrow(0, B, B)));
    // dh_v = (dz @ w2) * (h_v > 0) for v in (avg, mx): (2B, R).
    const at::Tensor t = at::mm(dz, w2f).contiguous();
    at::Tensor dh = at::empty({2 * B, R}, P.options());
    {
      const acc_t* tp = t.data_ptr<acc_t>();
      const acc_t* hp = h.data_ptr<acc_t>();
      acc_t* dhp = dh.data_ptr<acc_t>();
      const int64_t BR = B * R;
      for (int64_t i = 0; i < 2 * BR; ++i) {
        const acc_t mask = hp[i] > acc_t(0) ? acc_t(1) : acc_t(0);
        dhp[i] = tp[i < BR ? i : i - BR] * mask;
      }
    }
    // dw1 = dh_avg.T @ avg + dh_mx.T @ mx = dh.T @ P: (R, C).
    dw1.copy_(at::mm(dh.t(), P));
    // [d_avg; d_mx] = dh @ w1: (2B, C).
    const at::Tensor dP = at::mm(dh, w1f).contiguous();
    const acc_t* d_avg = dP.data_ptr<acc_t>();
    const acc_t* d_mx = d_avg + B * C;

    // dx = d_avg / (H*W) everywhere, plus d_mx at the first maximum.
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t n_hw = static_cast<acc_t>(HW);
    at::parallel_for(0, B * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t base = d_avg[i] / n_hw;
        scalar_t* plane = dxp + i * HW;
        std::fill(plane, plane + HW, static_cast<scalar_t>(base));
        plane[arg[i]] = static_cast<scalar_t>(base + d_mx[i]);
      }
    });
  });
  return {dx, dw1, dw2};
}

TORCH_LIBRARY_IMPL(adarts_C, CPU, m) {
  m.impl("attention_score_fwd", &attention_score_fwd_cpu);
  m.impl("attention_score_bwd", &attention_score_bwd_cpu);
}

}  // namespace adarts
