// CPU kernels of adarts_C::mixed_sum_fwd / mixed_sum_bwd.
//
// Specification: adarts_kernels/ops/reference.py (mixed_sum_pools, mixed_sum_fwd,
// mixed_sum_bwd). Shapes: x (B, n, H, W); z: P tensors (B, n, Ho, Wo) with Ho = H / s,
// Wo = W / s (0 <= P <= kMixedSumMaxZ); z_weights (P,); pool_weights (2,); identity_weight
// (optional, 0-dim, s = 1 only; written wi below); Q = P + 2.
//
//   u_0 = maxpool3x3(x), u_1 = avgpool3x3(x) (stride s, padding 1, the mean over the window's
//   in-bounds cells), u_{2+i} = z[i];  v = (pool_weights[0], pool_weights[1], z_weights[0], ...).
//
// Forward:
//   training: mean_q[c] = sum_{b,p} u_q / N, var_q[c] = sum_{b,p} (u_q - mean_q)^2 / N,
//             N = B * Ho * Wo (biased variance); eval: the given running statistics;
//   r_q = 1 / sqrt(var_q + eps),  uh_q = (u_q - mean_q) * r_q,
//   y = sum_q v_q * uh_q  (+ wi * x when the identity weight is given).
// Backward (g = grad):
//   dv_q = sum(g * uh_q) (dpool_weights = dv_0..1, dz_weights = dv_2..);  dwi = sum(g * x), or 0
//   without the identity;
//   du_q = v_q * r_q * (g - mean_c(g) - uh_q * mean_c(g * uh_q))   (training)
//   du_q = v_q * r_q * g                                            (eval)
//   dz[i] = du_{2+i};  dx = maxpool_bwd(du_0) + avgpool_bwd(du_1)  (+ wi * g).
// The max pool's gradient goes to the first maximum of each window in row-major order (a
// NaN counts as the maximum: the window's last NaN), as F.max_pool2d on the CPU; pooling is
// recomputed from x (no indices are stored).
//
// Work is split over the (b, c) planes (at::parallel_for). The per-channel reductions are
// per-plane partials combined in a fixed order (deterministic, independent of the thread
// count): in the forward, each plane's sum and sum of squared deviations about the plane
// mean (a two-pass variance within the plane), combined as
//   M2 = sum_b [M2_b + HWo * (mean_b - mean)^2]   (exact: every plane has HWo values).
// The 3x3 pools are separable: a pass along each input row (the window's 1-3 columns), then
// one across the window's 1-3 rows (row-then-column keeps the row-major first maximum).
// Arithmetic in at::opmath_type<scalar_t> (float for float16 / bfloat16 / float32, double
// for float64), which is also the statistics' dtype; outputs rounded to the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../validate.h"
#include "reduce.h"

namespace adarts {
namespace {

constexpr const char* kOp = "mixed_sum";
constexpr int64_t kMaxZ = kMixedSumMaxZ;

using Dims = MixedSumDims;

// In-bounds range [lo, hi) of the window of output index o along an axis of length L: input
// indices s*o - 1 .. s*o + 1 (3 wide, padding 1), clipped to [0, L).
inline int64_t win_lo(int64_t o, int64_t s) { return std::max<int64_t>(s * o - 1, 0); }
inline int64_t win_hi(int64_t o, int64_t s, int64_t L) { return std::min<int64_t>(s * o + 2, L); }

// The max pool's running-maximum update: v replaces the current maximum m when v > m or v is
// NaN. Visiting a window in row-major order this keeps the first maximum, or the last NaN.
template <typename acc_t>
inline bool takes(acc_t v, acc_t m) {
  return v > m || v != v;
}

// Per-thread scratch of the pools of one plane.
template <typename acc_t>
struct PoolScratch {
  std::vector<acc_t> row;          // (W,) one input row in acc_t
  std::vector<acc_t> hmax, hsum;   // (H, Wo): max / sum over each output column's 1-3 input columns
  std::vector<int32_t> harg;       // (H, Wo): the column of that row maximum
  explicit PoolScratch(const Dims& d)
      : row(static_cast<size_t>(d.W)),
        hmax(static_cast<size_t>(d.H * d.Wo)),
        hsum(static_cast<size_t>(d.H * d.Wo)),
        harg(static_cast<size_t>(d.H * d.Wo)) {}
};

// Both pools of one H x W plane xp, Ho x Wo outputs in row-major order:
//   mx[p] = max of the window, visited in row-major order with `takes` (first maximum, last
//           NaN; a window of -inf gives -inf at its first cell); arg[p] (kArg) = its flat
//           index in the plane;
//   av[p] = (sum of the window's in-bounds cells) / (their count).
// Separable: the row pass reduces each input row over the window columns of every output
// column (the first maximum of the row), the column pass reduces those over the window rows;
// the earliest row holding the window maximum wins, hence the row-major first maximum (and
// for NaN the last row holding one, at its last NaN: the row-major last NaN).
template <typename scalar_t, typename acc_t, bool kArg>
void pool_plane(const scalar_t* xp, const Dims& d, PoolScratch<acc_t>& ps, acc_t* mx, acc_t* av, int32_t* arg) {
  const int64_t H = d.H, W = d.W, Wo = d.Wo, Ho = d.Ho, s = d.stride;
  // Interior output columns [1, last_in]: all three window columns in bounds.
  const int64_t last_in = std::min<int64_t>(Wo - 1, (W - 2) / s);
  acc_t* row = ps.row.data();
  for (int64_t r = 0; r < H; ++r) {
    const scalar_t* xr = xp + r * W;
    for (int64_t c = 0; c < W; ++c) row[c] = static_cast<acc_t>(xr[c]);
    acc_t* hm = ps.hmax.data() + r * Wo;
    acc_t* hs = ps.hsum.data() + r * Wo;
    int32_t* ha = ps.harg.data() + r * Wo;
    const auto clipped = [&](int64_t oj) {
      const int64_t c0 = win_lo(oj, s), c1 = win_hi(oj, s, W);
      acc_t m = row[c0], sum = row[c0];
      int64_t k = c0;
      for (int64_t c = c0 + 1; c < c1; ++c) {
        sum += row[c];
        if (takes(row[c], m)) {
          m = row[c];
          k = c;
        }
      }
      hm[oj] = m;
      hs[oj] = sum;
      if (kArg) ha[oj] = static_cast<int32_t>(k);
    };
    clipped(0);
    for (int64_t oj = 1; oj <= last_in; ++oj) {
      const int64_t c = s * oj;
      const acc_t a = row[c - 1], b = row[c], e = row[c + 1];
      hs[oj] = (a + b) + e;
      const bool tb = takes(b, a);
      const acc_t m1 = tb ? b : a;
      const bool te = takes(e, m1);
      hm[oj] = te ? e : m1;
      if (kArg) ha[oj] = static_cast<int32_t>(te ? c + 1 : (tb ? c : c - 1));
    }
    for (int64_t oj = std::max<int64_t>(last_in + 1, 1); oj < Wo; ++oj) clipped(oj);
  }
  for (int64_t oi = 0; oi < Ho; ++oi) {
    const int64_t r0 = win_lo(oi, s), r1 = win_hi(oi, s, H);
    const acc_t rows = static_cast<acc_t>(r1 - r0);
    acc_t* m_out = mx + oi * Wo;
    acc_t* a_out = av + oi * Wo;
    int32_t* g_out = kArg ? arg + oi * Wo : nullptr;
    const acc_t* hm0 = ps.hmax.data() + r0 * Wo;
    const acc_t* hs0 = ps.hsum.data() + r0 * Wo;
    const int32_t* ha0 = ps.harg.data() + r0 * Wo;
    const int32_t rw0 = static_cast<int32_t>(r0 * W);
    for (int64_t oj = 0; oj < Wo; ++oj) {
      m_out[oj] = hm0[oj];
      a_out[oj] = hs0[oj];
      if (kArg) g_out[oj] = rw0 + ha0[oj];
    }
    for (int64_t r = r0 + 1; r < r1; ++r) {
      const acc_t* hm = ps.hmax.data() + r * Wo;
      const acc_t* hs = ps.hsum.data() + r * Wo;
      const int32_t* ha = ps.harg.data() + r * Wo;
      const int32_t rw = static_cast<int32_t>(r * W);
      for (int64_t oj = 0; oj < Wo; ++oj) {
        a_out[oj] += hs[oj];
        const bool t = takes(hm[oj], m_out[oj]);
        m_out[oj] = t ? hm[oj] : m_out[oj];
        if (kArg) g_out[oj] = t ? rw + ha[oj] : g_out[oj];
      }
    }
    // mean over the in-bounds cells: rows * columns of the window
    a_out[0] = a_out[0] / (rows * static_cast<acc_t>(win_hi(0, s, W) - win_lo(0, s)));
    for (int64_t oj = 1; oj <= last_in; ++oj) a_out[oj] = a_out[oj] / (rows * acc_t(3));
    for (int64_t oj = std::max<int64_t>(last_in + 1, 1); oj < Wo; ++oj)
      a_out[oj] = a_out[oj] / (rows * static_cast<acc_t>(win_hi(oj, s, W) - win_lo(oj, s)));
  }
}

// (sum, sum of squared deviations about the plane mean) of n values u[0..n).
template <typename acc_t, typename T>
inline void plane_moments(const T* u, int64_t n, acc_t& sum, acc_t& m2) {
  sum = blocked_sum<acc_t>(n, [&](int64_t p) { return static_cast<acc_t>(u[p]); });
  const acc_t m = sum / static_cast<acc_t>(n);
  m2 = blocked_sum<acc_t>(n, [&](int64_t p) {
    const acc_t dv = static_cast<acc_t>(u[p]) - m;
    return dv * dv;
  });
}

// sum_p g[p] * ((u[p] - m) * r)
template <typename acc_t, typename T>
inline acc_t dot_normalised(const acc_t* g, const T* u, int64_t n, acc_t m, acc_t r) {
  return blocked_sum<acc_t>(n, [&](int64_t p) { return g[p] * ((static_cast<acc_t>(u[p]) - m) * r); });
}

// Per-(q, c) normalisation: mean, r = 1 / sqrt(var + eps), and the weights.
template <typename acc_t>
struct Norm {
  std::vector<acc_t> mean, rstd;  // (Q, n)
  std::vector<acc_t> wq;          // (Q,): v_q
  acc_t wi;                       // the identity's weight (0 without the identity term)
};

template <typename scalar_t, typename acc_t>
Norm<acc_t> make_norm(const Dims& d, const at::Tensor& mean, const at::Tensor& var, const at::Tensor& z_weights,
                      const at::Tensor& pool_weights, const std::optional<at::Tensor>& identity_weight,
                      double eps) {
  Norm<acc_t> nm;
  const int64_t Qn = d.Q * d.n;
  const acc_t* mp = mean.data_ptr<acc_t>();
  const acc_t* vp = var.data_ptr<acc_t>();
  const scalar_t* pw = pool_weights.data_ptr<scalar_t>();
  const scalar_t* zw = d.P > 0 ? z_weights.data_ptr<scalar_t>() : nullptr;
  const acc_t e = static_cast<acc_t>(eps);  // var + eps in the statistics dtype, as the reference
  nm.mean.assign(mp, mp + Qn);
  nm.rstd.resize(static_cast<size_t>(Qn));
  for (int64_t i = 0; i < Qn; ++i) nm.rstd[i] = acc_t(1) / std::sqrt(vp[i] + e);
  nm.wq.resize(static_cast<size_t>(d.Q));
  for (int64_t q = 0; q < d.Q; ++q) nm.wq[q] = static_cast<acc_t>(q < 2 ? pw[q] : zw[q - 2]);
  nm.wi = d.identity ? static_cast<acc_t>(*identity_weight->data_ptr<scalar_t>()) : acc_t(0);
  return nm;
}

template <typename T>
std::array<T*, kMaxZ> data_pointers(at::TensorList ts) {
  std::array<T*, kMaxZ> p{};
  for (size_t i = 0; i < ts.size(); ++i) p[i] = ts[i].data_ptr<std::remove_const_t<T>>();
  return p;
}

// Planes per parallel chunk: a plane costs about (8 + 2 Q) element operations per output.
inline int64_t grain(const Dims& d) { return plane_grain((8 + 2 * d.Q) * d.Ho * d.Wo); }

// Training statistics: mean, var (Q, n) from per-plane partials (see the file comment).
template <typename scalar_t, typename acc_t>
void batch_stats(const scalar_t* xp, const std::array<const scalar_t*, kMaxZ>& zp, const Dims& d, acc_t* mean,
                 acc_t* var) {
  const int64_t HW = d.H * d.W, HWo = d.Ho * d.Wo, planes = d.B * d.n, Q = d.Q;
  // part_sum[i * Q + q], part_m2[i * Q + q]: plane i = b * n + c.
  std::vector<acc_t> part_sum(static_cast<size_t>(planes * Q)), part_m2(static_cast<size_t>(planes * Q));
  at::parallel_for(0, planes, grain(d), [&](int64_t begin, int64_t end) {
    PoolScratch<acc_t> ps(d);
    std::vector<acc_t> mx(static_cast<size_t>(HWo)), av(static_cast<size_t>(HWo));
    for (int64_t i = begin; i < end; ++i) {
      pool_plane<scalar_t, acc_t, false>(xp + i * HW, d, ps, mx.data(), av.data(), nullptr);
      acc_t* ps_ = part_sum.data() + i * Q;
      acc_t* pm = part_m2.data() + i * Q;
      plane_moments(mx.data(), HWo, ps_[0], pm[0]);
      plane_moments(av.data(), HWo, ps_[1], pm[1]);
      for (int64_t q = 2; q < Q; ++q) plane_moments(zp[q - 2] + i * HWo, HWo, ps_[q], pm[q]);
    }
  });
  // B == 0 gives 0 / 0 = NaN statistics, as torch.var_mean of nothing.
  const acc_t hwo = static_cast<acc_t>(HWo), count = static_cast<acc_t>(d.B * HWo);
  for (int64_t q = 0; q < Q; ++q) {
    for (int64_t c = 0; c < d.n; ++c) {
      const auto at_ = [&](int64_t b) { return (b * d.n + c) * Q + q; };
      const acc_t m = blocked_sum<acc_t>(d.B, [&](int64_t b) { return part_sum[at_(b)]; }) / count;
      const acc_t m2 = blocked_sum<acc_t>(d.B, [&](int64_t b) {
        const acc_t dm = part_sum[at_(b)] / hwo - m;
        return part_m2[at_(b)] + hwo * (dm * dm);
      });
      mean[q * d.n + c] = m;
      var[q * d.n + c] = m2 / count;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_sum_fwd_cpu(
    at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights, const at::Tensor& pool_weights,
    const std::optional<at::Tensor>& identity_weight, int64_t stride, double eps,
    const std::optional<at::Tensor>& run_mean, const std::optional<at::Tensor>& run_var) {
  constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;
  const Dims d = validate_mixed_sum(kOp, z, x, z_weights, pool_weights, identity_weight, stride, kCPU);
  validate_mixed_sum_eps(kOp, eps);
  validate_mixed_sum_running(kOp, run_mean, run_var, x, d, kCPU);
  const bool training = !run_mean.has_value();
  const auto sopt = x.options().dtype(mixed_sum_stats_dtype(x));
  at::Tensor y = at::empty({d.B, d.n, d.Ho, d.Wo}, x.options());
  at::Tensor mean = at::empty({d.Q, d.n}, sopt), var = at::empty({d.Q, d.n}, sopt);
  if (!training) {  // a copy in the statistics dtype (the running buffers are never aliased)
    mean.copy_(*run_mean);
    var.copy_(*run_var);
  }
  const int64_t HW = d.H * d.W, HWo = d.Ho * d.Wo, planes = d.B * d.n;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts mixed_sum_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const auto zp = data_pointers<const scalar_t>(z);
    if (training) batch_stats<scalar_t, acc_t>(xp, zp, d, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    if (y.numel() == 0) return;
    const Norm<acc_t> nm = make_norm<scalar_t, acc_t>(d, mean, var, z_weights, pool_weights, identity_weight, eps);
    scalar_t* yp = y.data_ptr<scalar_t>();

    at::parallel_for(0, planes, grain(d), [&](int64_t begin, int64_t end) {
      PoolScratch<acc_t> ps(d);
      std::vector<acc_t> mx(static_cast<size_t>(HWo)), av(static_cast<size_t>(HWo));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % d.n;
        pool_plane<scalar_t, acc_t, false>(xp + i * HW, d, ps, mx.data(), av.data(), nullptr);
        // y = sum_q v_q * ((u_q - mean_q) * r_q), added in q order (as the reference), built
        // in mx (u_0 is read before it is overwritten).
        acc_t* a = mx.data();
        {
          const acc_t m0 = nm.mean[c], r0 = nm.rstd[c], w0 = nm.wq[0];
          const acc_t m1 = nm.mean[d.n + c], r1 = nm.rstd[d.n + c], w1 = nm.wq[1];
          const acc_t* u1 = av.data();
          for (int64_t p = 0; p < HWo; ++p) a[p] = w0 * ((a[p] - m0) * r0) + w1 * ((u1[p] - m1) * r1);
        }
        for (int64_t q = 2; q < d.Q; ++q) {
          const acc_t m = nm.mean[q * d.n + c], r = nm.rstd[q * d.n + c], wq = nm.wq[q];
          const scalar_t* u = zp[q - 2] + i * HWo;
          for (int64_t p = 0; p < HWo; ++p) a[p] += wq * ((static_cast<acc_t>(u[p]) - m) * r);
        }
        scalar_t* out = yp + i * HWo;
        if (d.identity) {  // + wi * x (stride 1: Ho x Wo == H x W)
          const scalar_t* xs = xp + i * HW;
          for (int64_t p = 0; p < HWo; ++p) out[p] = static_cast<scalar_t>(a[p] + nm.wi * static_cast<acc_t>(xs[p]));
        } else {
          for (int64_t p = 0; p < HWo; ++p) out[p] = static_cast<scalar_t>(a[p]);
        }
      }
    });
  });
  return {y, mean, var};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixed_sum_bwd_cpu(
    const at::Tensor& grad, at::TensorList z, const at::Tensor& x, const at::Tensor& z_weights,
    const at::Tensor& pool_weights, const std::optional<at::Tensor>& identity_weight, const at::Tensor& mean,
    const at::Tensor& var, int64_t stride, double eps, bool training) {
  constexpr c10::DeviceType kCPU = c10::DeviceType::CPU;
  const Dims d = validate_mixed_sum(kOp, z, x, z_weights, pool_weights, identity_weight, stride, kCPU);
  validate_mixed_sum_eps(kOp, eps);
  validate_mixed_sum_bwd(kOp, grad, mean, var, x, d, kCPU);
  // The int32 positions are r * W + column < H * W (pool_plane's rw, rw0 and arg), so H*W <= INT32_MAX
  // covers every offset formed.
  ADARTS_CHECK(d.H * d.W <= INT32_MAX, kOp, "planes H*W must have fewer than 2^31 elements (32-bit max-pool ",
               "positions), got x of sizes ", x.sizes());
  const int64_t H = d.H, W = d.W, Ho = d.Ho, Wo = d.Wo, s = d.stride;
  const int64_t HW = H * W, HWo = Ho * Wo, planes = d.B * d.n, Q = d.Q;
  // Per-plane partial sums, K per plane: [sum g, sum g * uh_0, ..., sum g * uh_{Q-1}, sum g * x].
  const int64_t K = Q + 2;

  std::vector<at::Tensor> dz;
  dz.reserve(z.size());
  for (const at::Tensor& t : z) dz.push_back(at::empty(t.sizes(), t.options()));
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dzw = at::empty(z_weights.sizes(), z_weights.options());
  at::Tensor dpw = at::empty(pool_weights.sizes(), pool_weights.options());
  // 0-dim; 0 without the identity term (the op cannot return None)
  at::Tensor diw = at::empty({}, identity_weight.has_value() ? identity_weight->options() : pool_weights.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts mixed_sum_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const auto zp = data_pointers<const scalar_t>(z);
    const auto dzp = data_pointers<scalar_t>(dz);
    const Norm<acc_t> nm = make_norm<scalar_t, acc_t>(d, mean, var, z_weights, pool_weights, identity_weight, eps);

    // ---- pass 1: per-plane partial sums (for the weights' gradients, and the training terms mean_c(.)).
    std::vector<acc_t> part(static_cast<size_t>(planes * K), acc_t(0));
    at::parallel_for(0, planes, grain(d), [&](int64_t begin, int64_t end) {
      PoolScratch<acc_t> ps(d);
      std::vector<acc_t> mx(static_cast<size_t>(HWo)), av(static_cast<size_t>(HWo)), g(static_cast<size_t>(HWo));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % d.n;
        const scalar_t* gs = gp + i * HWo;
        for (int64_t p = 0; p < HWo; ++p) g[p] = static_cast<acc_t>(gs[p]);
        pool_plane<scalar_t, acc_t, false>(xp + i * HW, d, ps, mx.data(), av.data(), nullptr);
        acc_t* pt = part.data() + i * K;
        pt[0] = blocked_sum<acc_t>(HWo, [&](int64_t p) { return g[p]; });
        pt[1] = dot_normalised(g.data(), mx.data(), HWo, nm.mean[c], nm.rstd[c]);
        pt[2] = dot_normalised(g.data(), av.data(), HWo, nm.mean[d.n + c], nm.rstd[d.n + c]);
        for (int64_t q = 2; q < Q; ++q)
          pt[1 + q] = dot_normalised(g.data(), zp[q - 2] + i * HWo, HWo, nm.mean[q * d.n + c], nm.rstd[q * d.n + c]);
        if (d.identity) {
          const scalar_t* xs = xp + i * HW;
          pt[Q + 1] = blocked_sum<acc_t>(HWo, [&](int64_t p) { return g[p] * static_cast<acc_t>(xs[p]); });
        }
      }
    });

    // ---- combine: channel means (training) and the weights' gradients, summed in a fixed order.
    const acc_t count = static_cast<acc_t>(d.B * HWo);
    std::vector<acc_t> g_mean(static_cast<size_t>(d.n), acc_t(0)), gu_mean(static_cast<size_t>(Q * d.n), acc_t(0));
    if (training) {
      for (int64_t c = 0; c < d.n; ++c) {
        const auto at_ = [&](int64_t b, int64_t k) { return (b * d.n + c) * K + k; };
        g_mean[c] = blocked_sum<acc_t>(d.B, [&](int64_t b) { return part[at_(b, 0)]; }) / count;
        for (int64_t q = 0; q < Q; ++q)
          gu_mean[q * d.n + c] = blocked_sum<acc_t>(d.B, [&](int64_t b) { return part[at_(b, 1 + q)]; }) / count;
      }
    }
    {
      scalar_t* dpwp = dpw.data_ptr<scalar_t>();
      scalar_t* dzwp = d.P > 0 ? dzw.data_ptr<scalar_t>() : nullptr;
      for (int64_t q = 0; q < Q; ++q) {
        const acc_t v = blocked_sum<acc_t>(planes, [&](int64_t i) { return part[i * K + 1 + q]; });
        (q < 2 ? dpwp[q] : dzwp[q - 2]) = static_cast<scalar_t>(v);
      }
      const acc_t vi =
          d.identity ? blocked_sum<acc_t>(planes, [&](int64_t i) { return part[i * K + Q + 1]; }) : acc_t(0);
      *diw.data_ptr<scalar_t>() = static_cast<scalar_t>(vi);
    }

    // ---- pass 2: dz, and dx = maxpool_bwd(du_0) + avgpool_bwd(du_1) (+ wi * g).
    // Window sizes (in-bounds cells) of the outputs, the same for every plane.
    std::vector<acc_t> cells(static_cast<size_t>(HWo));
    for (int64_t oi = 0; oi < Ho; ++oi)
      for (int64_t oj = 0; oj < Wo; ++oj)
        cells[oi * Wo + oj] = static_cast<acc_t>((win_hi(oi, s, H) - win_lo(oi, s)) * (win_hi(oj, s, W) - win_lo(oj, s)));
    at::parallel_for(0, planes, grain(d), [&](int64_t begin, int64_t end) {
      PoolScratch<acc_t> ps(d);
      std::vector<acc_t> mx(static_cast<size_t>(HWo)), av(static_cast<size_t>(HWo)), g(static_cast<size_t>(HWo));
      std::vector<acc_t> du(static_cast<size_t>(HWo)), vs(static_cast<size_t>(H * Wo)), davg(static_cast<size_t>(W));
      std::vector<int32_t> arg(static_cast<size_t>(HWo));
      std::vector<acc_t> dmax(static_cast<size_t>(HW));
      for (int64_t i = begin; i < end; ++i) {
        const int64_t c = i % d.n;
        const scalar_t* gs = gp + i * HWo;
        for (int64_t p = 0; p < HWo; ++p) g[p] = static_cast<acc_t>(gs[p]);
        pool_plane<scalar_t, acc_t, true>(xp + i * HW, d, ps, mx.data(), av.data(), arg.data());
        const acc_t gm = g_mean[c];
        // du_q over the plane into out[0..HWo) (acc_t or scalar_t).
        const auto du_plane = [&](int64_t q, const auto* u, auto* out) {
          using out_t = std::remove_pointer_t<decltype(out)>;
          const acc_t m = nm.mean[q * d.n + c], r = nm.rstd[q * d.n + c], coef = nm.wq[q] * r;
          if (training) {
            const acc_t gum = gu_mean[q * d.n + c];
            for (int64_t p = 0; p < HWo; ++p) {
              const acc_t uh = (static_cast<acc_t>(u[p]) - m) * r;
              out[p] = static_cast<out_t>((g[p] - gm - uh * gum) * coef);
            }
          } else {
            for (int64_t p = 0; p < HWo; ++p) out[p] = static_cast<out_t>(g[p] * coef);
          }
        };
        for (int64_t q = 2; q < Q; ++q) du_plane(q, zp[q - 2] + i * HWo, dzp[q - 2] + i * HWo);
        // max pool: du_0 to the window maximum, outputs in row-major order
        du_plane(0, mx.data(), du.data());
        std::fill(dmax.begin(), dmax.end(), acc_t(0));
        for (int64_t p = 0; p < HWo; ++p) dmax[arg[p]] += du[p];
        // avg pool: delta = du_1 / count spread over the window, transposed separably: first
        // over the window rows (vs: (H, Wo)), then over the window columns (davg, per row).
        du_plane(1, av.data(), du.data());
        for (int64_t p = 0; p < HWo; ++p) du[p] = du[p] / cells[p];
        std::fill(vs.begin(), vs.end(), acc_t(0));
        for (int64_t oi = 0; oi < Ho; ++oi) {
          const acc_t* dr = du.data() + oi * Wo;
          for (int64_t r = win_lo(oi, s), r1 = win_hi(oi, s, H); r < r1; ++r) {
            acc_t* v = vs.data() + r * Wo;
            for (int64_t oj = 0; oj < Wo; ++oj) v[oj] += dr[oj];
          }
        }
        scalar_t* out = dxp + i * HW;
        for (int64_t r = 0; r < H; ++r) {
          const acc_t* v = vs.data() + r * Wo;
          acc_t* da = davg.data();
          if (s == 1) {  // column col is covered by outputs col - 1, col, col + 1
            da[0] = W > 1 ? v[0] + v[1] : v[0];
            for (int64_t col = 1; col + 1 < W; ++col) da[col] = (v[col - 1] + v[col]) + v[col + 1];
            if (W > 1) da[W - 1] = v[W - 2] + v[W - 1];
          } else {  // column 2k by output k, column 2k + 1 by outputs k and k + 1
            for (int64_t k = 0; k + 1 < Wo; ++k) {
              da[2 * k] = v[k];
              da[2 * k + 1] = v[k] + v[k + 1];
            }
            da[2 * (Wo - 1)] = v[Wo - 1];
            da[2 * (Wo - 1) + 1] = v[Wo - 1];
          }
          const acc_t* dm = dmax.data() + r * W;
          scalar_t* o = out + r * W;
          if (d.identity) {  // + wi * g (the identity; stride 1, Ho x Wo == H x W)
            const acc_t* gr = g.data() + r * W;
            for (int64_t col = 0; col < W; ++col) o[col] = static_cast<scalar_t>((dm[col] + da[col]) + nm.wi * gr[col]);
          } else {
            for (int64_t col = 0; col < W; ++col) o[col] = static_cast<scalar_t>(dm[col] + da[col]);
          }
        }
      }
    });
  });
  return {dz, dx, dzw, dpw, diw};
}

TORCH_LIBRARY_IMPL(adarts_C, CPU, m) {
  m.impl("mixed_sum_fwd", &mixed_sum_fwd_cpu);
  m.impl("mixed_sum_bwd", &mixed_sum_bwd_cpu);
}

}  // namespace adarts
