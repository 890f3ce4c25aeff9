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
#include <numeric>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace adarts {
namespace {

constexpr const char* kOp = "attention_score";

// Global average and first maximum of one contiguous plane of n >= 1 elements, in one pass.
// The maximum uses a strict '>' (ties keep the first position); a NaN becomes the maximum
// and the first NaN is kept, as torch.max(dim) does.
template <typename scalar_t, typename acc_t>
inline void pool_plane(const scalar_t* p, int64_t n, acc_t& avg, acc_t& mx, int64_t& arg) {
  constexpr int64_t kBlock = 512;
  acc_t total = acc_t(0);
  acc_t m = static_cast<acc_t>(p[0]);
  int64_t am = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    acc_t lane[8] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0),
                     acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    for (int64_t i = start; i < end; ++i) {
      const acc_t v = static_cast<acc_t>(p[i]);
      lane[i & 7] += v;
      if (v > m || (std::isnan(v) && !std::isnan(m))) {
        m = v;
        am = i;
      }
    }
    total += ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  }
  avg = total / static_cast<acc_t>(n);
  mx = m;
  arg = am;
}

// Pools of all B*C planes of a contiguous x.
template <typename scalar_t, typename acc_t>
void pool_all(const scalar_t* x, int64_t planes, int64_t hw, acc_t* avg, acc_t* mx, int64_t* arg) {
  at::parallel_for(0, planes, plane_grain(hw), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      pool_plane<scalar_t, acc_t>(x + i * hw, hw, avg[i], mx[i], arg[i]);
    }
  });
}

template <typename scalar_t, typename acc_t>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  std::vector<acc_t> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<acc_t>(p[i]);
  return out;
}

// relu as torch computes it: NaN stays NaN.
template <typename acc_t>
inline acc_t relu(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// h[r] = relu(sum_k w1[r, k] * v[k]) for one batch row v (length C).
template <typename acc_t>
inline void hidden(const acc_t* w1, const acc_t* v, int64_t R, int64_t C, acc_t* h) {
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* wr = w1 + r * C;
    acc_t s = acc_t(0);
    for (int64_t k = 0; k < C; ++k) s += wr[k] * v[k];
    h[r] = relu(s);
  }
}

void check_x_w(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  CHECK_CPU(kOp, x);
  CHECK_DIM(kOp, x, 4);
  CHECK_FLOATING(kOp, x);
  CHECK_CONTIGUOUS(kOp, x);
  ADARTS_CHECK(x.size(2) > 0 && x.size(3) > 0, kOp,
               "x must have non-empty planes (H, W >= 1) for the global pools, got sizes ", x.sizes());
  const int64_t C = x.size(1);
  CHECK_INPUT_LIKE(kOp, w1, x);
  CHECK_INPUT_LIKE(kOp, w2, x);
  CHECK_DIM(kOp, w1, 2);
  CHECK_DIM(kOp, w2, 2);
  ADARTS_CHECK(w1.size(1) == C, kOp, "w1 must have shape (C/2, C) = (", C / 2, ", ", C,
               ") for x with C = ", C, " channels, got ", w1.sizes());
  ADARTS_CHECK(w2.size(0) == C && w2.size(1) == w1.size(0), kOp,
               "w2 must have shape (C, w1.size(0)) = (", C, ", ", w1.size(0), "), got ", w2.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_score_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                           const at::Tensor& w2, int64_t n_select) {
  check_x_w(x, w1, w2);
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), R = w1.size(0);
  ADARTS_CHECK(n_select >= 1 && n_select <= C, kOp, "n_select must be in [1, C] = [1, ", C,
               "], got ", n_select);

  at::Tensor a = at::empty({B, C}, x.options());
  at::Tensor idx = at::empty({n_select}, x.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_score_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t BC = static_cast<size_t>(B * C);
    std::vector<acc_t> avg(BC), mx(BC);
    std::vector<int64_t> arg(BC);
    pool_all<scalar_t, acc_t>(x.data_ptr<scalar_t>(), B * C, HW, avg.data(), mx.data(), arg.data());

    const std::vector<acc_t> w1f = to_acc<scalar_t, acc_t>(w1);
    const std::vector<acc_t> w2f = to_acc<scalar_t, acc_t>(w2);
    std::vector<acc_t> af(BC);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> h_avg(static_cast<size_t>(R)), h_mx(static_cast<size_t>(R));
      for (int64_t b = begin; b < end; ++b) {
        hidden(w1f.data(), avg.data() + b * C, R, C, h_avg.data());
        hidden(w1f.data(), mx.data() + b * C, R, C, h_mx.data());
        for (int64_t c = 0; c < C; ++c) {
          const acc_t* wc = w2f.data() + c * R;
          acc_t za = acc_t(0), zm = acc_t(0);
          for (int64_t r = 0; r < R; ++r) {
            za += wc[r] * h_avg[r];
            zm += wc[r] * h_mx[r];
          }
          const acc_t z = za + zm;
          af[b * C + c] = acc_t(1) / (acc_t(1) + std::exp(-z));
        }
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
  CHECK_INPUT_LIKE(kOp, a, x);
  CHECK_INPUT_LIKE(kOp, grad_a, x);
  CHECK_SHAPE(kOp, a, B, C);
  CHECK_SHAPE(kOp, grad_a, B, C);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw1 = at::empty(w1.sizes(), w1.options());
  at::Tensor dw2 = at::empty(w2.sizes(), w2.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_score_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const size_t BC = static_cast<size_t>(B * C), BR = static_cast<size_t>(B * R);
    std::vector<acc_t> avg(BC), mx(BC);
    std::vector<int64_t> arg(BC);
    pool_all<scalar_t, acc_t>(x.data_ptr<scalar_t>(), B * C, HW, avg.data(), mx.data(), arg.data());

    const std::vector<acc_t> w1f = to_acc<scalar_t, acc_t>(w1);
    const std::vector<acc_t> w2f = to_acc<scalar_t, acc_t>(w2);
    const scalar_t* gp = grad_a.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();

    // Per batch row: dz, hidden activations, their gradients, and the pool gradients.
    std::vector<acc_t> dz(BC), h_avg(BR), h_mx(BR), dh_avg(BR), dh_mx(BR), d_avg(BC), d_mx(BC);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t av = static_cast<acc_t>(ap[b * C + c]);
          dz[b * C + c] = static_cast<acc_t>(gp[b * C + c]) * av * (acc_t(1) - av);
        }
        hidden(w1f.data(), avg.data() + b * C, R, C, h_avg.data() + b * R);
        hidden(w1f.data(), mx.data() + b * C, R, C, h_mx.data() + b * R);
        for (int64_t r = 0; r < R; ++r) {
          acc_t t = acc_t(0);  // (dz @ w2)[b, r]
          for (int64_t c = 0; c < C; ++c) t += dz[b * C + c] * w2f[c * R + r];
          const acc_t ma = h_avg[b * R + r] > acc_t(0) ? acc_t(1) : acc_t(0);
          const acc_t mm = h_mx[b * R + r] > acc_t(0) ? acc_t(1) : acc_t(0);
          dh_avg[b * R + r] = t * ma;
          dh_mx[b * R + r] = t * mm;
        }
        for (int64_t k = 0; k < C; ++k) {
          acc_t sa = acc_t(0), sm = acc_t(0);
          for (int64_t r = 0; r < R; ++r) {
            sa += dh_avg[b * R + r] * w1f[r * C + k];
            sm += dh_mx[b * R + r] * w1f[r * C + k];
          }
          d_avg[b * C + k] = sa;
          d_mx[b * C + k] = sm;
        }
      }
    });

    // dw2 = dz.T @ (h_avg + h_mx): (C, R).
    scalar_t* dw2p = dw2.data_ptr<scalar_t>();
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t r = 0; r < R; ++r) {
          acc_t s = acc_t(0);
          for (int64_t b = 0; b < B; ++b) s += dz[b * C + c] * (h_avg[b * R + r] + h_mx[b * R + r]);
          dw2p[c * R + r] = static_cast<scalar_t>(s);
        }
      }
    });

    // dw1 = dh_avg.T @ avg + dh_mx.T @ mx: (R, C).
    scalar_t* dw1p = dw1.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t k = 0; k < C; ++k) {
          acc_t sa = acc_t(0), sm = acc_t(0);
          for (int64_t b = 0; b < B; ++b) {
            sa += dh_avg[b * R + r] * avg[b * C + k];
            sm += dh_mx[b * R + r] * mx[b * C + k];
          }
          dw1p[r * C + k] = static_cast<scalar_t>(sa + sm);
        }
      }
    });

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
