// CUDA kernels of adarts_C::mixed_sum_fwd / mixed_sum_bwd.
//
// Specification: adarts_kernels/ops/reference.py (mixed_sum_pools, mixed_sum_fwd,
// mixed_sum_bwd); the same formulas as the CPU kernel (csrc/cpu/mixed_sum_kernel.cpp).
// x (B, n, H, W); z: P planes-stacks (B, n, Ho, Wo), Ho = H/s, Wo = W/s, 0 <= P <= kMaxZ;
// Q = P + 2; u_0 = maxpool3x3(x), u_1 = avgpool3x3(x) (padding 1, mean over the in-bounds
// cells), u_{2+i} = z[i]; v = (pool_weights[0], pool_weights[1], z_weights[0], ...); wi the
// identity weight when its pointer is non-null (stride 1 only):
//
//   forward   r_q = 1 / sqrt(var_q + eps),  uh_q = (u_q - mean_q) * r_q,
//             y = sum_q v_q * uh_q (+ wi * x)
//   backward  dv_q = sum(g * uh_q) (dpool_weights, dz_weights), dwi = sum(g * x) (0 without wi)
//             du_q = v_q r_q (g - mean_c(g) - uh_q mean_c(g uh_q))  (training; eval: v_q r_q g)
//             dz[i] = du_{2+i},  dx = maxpool_bwd(du_0) + avgpool_bwd(du_1) (+ wi g)
//
// Pipeline (all on `stream`, no host synchronisation, no atomics: bitwise deterministic):
//   forward   [training] stats_kernel: one group (warp or block) per (b, c) plane, per q the
//                        plane sum and the squared deviations about the plane mean;
//                        stats_combine_kernel: one thread per (q, c), planes added in b order,
//                        M2 = sum_b [M2_b + HWo (mean_b - mean)^2], var = M2 / N;
//             rstd_kernel: r = 1 / sqrt(var + eps);
//             fwd_y_kernel: one thread per output element (pools recomputed from x).
//   backward  rstd_kernel; bwd_partial_kernel: one group per plane, the Q + 2 plane sums
//             [g, g uh_0 .. g uh_{Q-1}, g x]; [training] bwd_combine_kernel: channel means;
//             dw_kernel: one block per weight (v_0 .. v_{Q-1}, wi), planes added in a fixed order;
//             bwd_du_kernel: one thread per output: dz, and du_1 / cells into the workspace;
//             bwd_dx_kernel: one thread per input element gathering the outputs whose window
//             holds it, in row-major output order (the order of the reference's scatter):
//             du_1 / cells from the workspace, and du_0 of the windows whose first maximum is
//             this element (decided from x, recomputed from the element's own value).
// Backward workspace: one accumulation-type value per output element (du_1 / cells), 4 bytes
// in float (8 in double); it held du_0, du_1 and the window argmax (12 bytes) before.
// 3x3 pool evaluations per output element, backward: bwd_partial_kernel one (max and mean),
// bwd_du_kernel one mean (the max is dead code there), bwd_dx_kernel the first-maximum test of
// each window holding the element (up to 9 per output element, comparisons only, each ending
// at the first cell that rules the element out). Before: two full pools (bwd_partial, bwd_du)
// and no test; the test replaces the stored argmax (and du_0, which is du(0, x[element]) when
// the element is the window maximum).
// The max pool keeps the first maximum of each window in row-major order, a NaN counting as
// the maximum (the window's last NaN), as F.max_pool2d. Accumulation in float (double for
// double); the statistics are in that accumulation type.
#include "common.cuh"

#include <climits>
#include <cstdint>

namespace adarts {
namespace cuda {
namespace {

// (the element-type helpers, sums, plane mapping and launch helpers are in common.cuh)

constexpr int kMaxZ = kMixedSumMaxZ;
constexpr int kMaxQ = kMaxZ + 2;

__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

template <typename T> struct ZIn { const T* p[kMaxZ]; };
template <typename T> struct ZOut { T* p[kMaxZ]; };

// Sizes shared by the kernels; in-plane indices fit in int (H * W < 2^31, checked).
struct Geom {
  int64_t B, n, planes;  // planes = B * n
  int H, W, Ho, Wo;
  int64_t HWo;           // Ho * Wo
  int stride, P, Q;
  int identity;          // 1: the identity term wi * x (stride 1)
};

// The weights of the terms: v_q = pool_weights[q] (q < 2), z_weights[q - 2] otherwise.
template <typename T> struct Weights {
  const T* pool;  // (2,)
  const T* z;     // (P,)
  const T* id;    // 0-dim, or nullptr without the identity term
};
template <typename T>
__device__ __forceinline__ typename AccT<T>::type weight_of(const Weights<T>& w, int q) {
  return to_acc(q < 2 ? w.pool[q] : w.z[q - 2]);
}

// Max-pool update: v replaces the maximum m when v > m or v is NaN (row-major visiting:
// the first maximum, or the last NaN).
template <typename A> __device__ __forceinline__ bool takes(A v, A m) { return v > m || v != v; }

// Both pools at output (oi, oj) of the plane xp (H x W): mx (and arg, its flat index in the
// plane), av = sum / cells over the window's in-bounds cells, visited in row-major order.
template <typename T, typename A>
__device__ __forceinline__ void pool_at(const T* __restrict__ xp, const Geom& g, int oi, int oj, A& mx, A& av,
                                        int& arg, int& cells) {
  const int r0 = max(g.stride * oi - 1, 0), r1 = min(g.stride * oi + 2, g.H);
  const int c0 = max(g.stride * oj - 1, 0), c1 = min(g.stride * oj + 2, g.W);
  A best = A(-INFINITY), sum = A(0);
  int where = r0 * g.W + c0;
  for (int r = r0; r < r1; ++r) {
    for (int c = c0; c < c1; ++c) {
      const A v = to_acc(xp[r * g.W + c]);
      sum += v;
      if (takes(v, best)) {
        best = v;
        where = r * g.W + c;
      }
    }
  }
  cells = (r1 - r0) * (c1 - c0);
  mx = best;
  av = sum / A(cells);
  arg = where;
}

// Whether the element at flat plane index at, of value v (the accumulation type), is the window
// maximum pool_at reports for output (oi, oj): every cell before it in row-major order is
// replaced by it (takes(v, c)), and no later cell replaces it (!takes(c, v)). The same rule
// as pool_at's scan (first maximum, or the last NaN), decided without the running maximum.
template <typename T, typename A>
__device__ __forceinline__ bool is_window_max(const T* __restrict__ xp, const Geom& g, int oi, int oj, int at, A v) {
  const int r0 = max(g.stride * oi - 1, 0), r1 = min(g.stride * oi + 2, g.H);
  const int c0 = max(g.stride * oj - 1, 0), c1 = min(g.stride * oj + 2, g.W);
  for (int r = r0; r < r1; ++r) {
    for (int c = c0; c < c1; ++c) {
      const int pos = r * g.W + c;
      if (pos == at) continue;
      const A u = to_acc(xp[pos]);
      if (pos < at ? !takes(v, u) : takes(u, v)) return false;
    }
  }
  return true;
}

template <typename A> __device__ __forceinline__ A group_sum(A v, int warp_mode, A* sh) {
  return warp_mode ? warp_sum(v) : block_sum(v, sh);
}

// ------------------------------------------------------------------ forward
// Per plane and q: part_sum = sum u_q, part_m2 = sum (u_q - part_sum / HWo)^2 (planes x Q).
template <typename T>
__global__ void __launch_bounds__(kThreads)
stats_kernel(const T* __restrict__ x, ZIn<T> z, Geom g, int warp_mode, typename AccT<T>::type* __restrict__ part_sum,
             typename AccT<T>::type* __restrict__ part_m2) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  Span s;
  if (!plane_span(g.planes, g.HWo, warp_mode, g.HWo, s)) return;
  const T* xp = x + s.plane * static_cast<int64_t>(g.H) * g.W;
  const A hwo = A(g.HWo);
  // Per pool (q = 0 max, 1 mean): the sum, then the squared deviations, pools recomputed in
  // each pass. One pool per pass, its results stored at once: with both pools in one pass,
  // the double division of the mean pool (a subroutine call) spilled registers in double.
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    A sq = A(0);
    for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) {
      const int oi = static_cast<int>(p) / g.Wo, oj = static_cast<int>(p) - oi * g.Wo;
      A mx, av;
      int arg, cells;
      pool_at(xp, g, oi, oj, mx, av, arg, cells);
      sq += q == 0 ? mx : av;
    }
    sq = group_sum(sq, warp_mode, sh);
    const A m = sq / hwo;
    A vq = A(0);
    for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) {
      const int oi = static_cast<int>(p) / g.Wo, oj = static_cast<int>(p) - oi * g.Wo;
      A mx, av;
      int arg, cells;
      pool_at(xp, g, oi, oj, mx, av, arg, cells);
      const A d = (q == 0 ? mx : av) - m;
      vq += d * d;
    }
    vq = group_sum(vq, warp_mode, sh);
    if (s.rank == 0) {
      part_sum[s.plane * g.Q + q] = sq;
      part_m2[s.plane * g.Q + q] = vq;
    }
  }
#pragma unroll
  for (int q = 2; q < kMaxQ; ++q) {
    if (q >= g.Q) break;
    const T* zp = z.p[q - 2] + s.plane * g.HWo;
    A sq = A(0);
    for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) sq += to_acc(zp[p]);
    sq = group_sum(sq, warp_mode, sh);
    const A m = sq / hwo;
    A vq = A(0);
    for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) {
      const A d = to_acc(zp[p]) - m;
      vq += d * d;
    }
    vq = group_sum(vq, warp_mode, sh);
    if (s.rank == 0) {
      part_sum[s.plane * g.Q + q] = sq;
      part_m2[s.plane * g.Q + q] = vq;
    }
  }
}

// One thread per (q, c): mean, var (Q, n) from the per-plane partials, planes in b order.
// B == 0 gives 0 / 0 = NaN, as torch.var_mean of nothing.
template <typename A>
__global__ void stats_combine_kernel(const A* __restrict__ part_sum, const A* __restrict__ part_m2, Geom g,
                                     A* __restrict__ mean, A* __restrict__ var) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= g.Q * g.n) return;
  const int64_t q = t / g.n, c = t - q * g.n;
  const A hwo = A(g.HWo), count = A(g.B * g.HWo);
  A S = A(0);
  for (int64_t b = 0; b < g.B; ++b) S += part_sum[(b * g.n + c) * g.Q + q];
  const A m = S / count;
  A M2 = A(0);
  for (int64_t b = 0; b < g.B; ++b) {
    const int64_t k = (b * g.n + c) * g.Q + q;
    const A dm = part_sum[k] / hwo - m;
    M2 += part_m2[k] + hwo * (dm * dm);
  }
  mean[t] = m;
  var[t] = M2 / count;
}

// rstd = 1 / sqrt(var + eps), (Q, n).
template <typename A>
__global__ void rstd_kernel(const A* __restrict__ var, int64_t count, A eps, A* __restrict__ rstd) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < count) rstd[t] = A(1) / acc_sqrt(var[t] + eps);
}

// One thread per output element (grid-stride): y = sum_q v_q uh_q (+ wi x).
template <typename T>
__global__ void __launch_bounds__(kThreads)
fwd_y_kernel(const T* __restrict__ x, ZIn<T> z, Weights<T> w, const typename AccT<T>::type* __restrict__ mean,
             const typename AccT<T>::type* __restrict__ rstd, Geom g, T* __restrict__ y) {
  using A = typename AccT<T>::type;
  const int64_t total = g.planes * g.HWo;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / g.HWo, c = plane % g.n;
    const int p = static_cast<int>(e - plane * g.HWo);
    const int oi = p / g.Wo, oj = p - oi * g.Wo;
    const T* xp = x + plane * static_cast<int64_t>(g.H) * g.W;
    A mx, av;
    int arg, cells;
    pool_at(xp, g, oi, oj, mx, av, arg, cells);
    A acc = weight_of(w, 0) * ((mx - mean[c]) * rstd[c]);
    acc = acc + weight_of(w, 1) * ((av - mean[g.n + c]) * rstd[g.n + c]);
#pragma unroll
    for (int q = 2; q < kMaxQ; ++q) {
      if (q >= g.Q) break;
      const int64_t k = q * g.n + c;
      acc = acc + weight_of(w, q) * ((to_acc(z.p[q - 2][e]) - mean[k]) * rstd[k]);
    }
    if (g.identity) acc = acc + to_acc(*w.id) * to_acc(xp[p]);  // the identity (stride 1: Ho x Wo == H x W)
    y[e] = from_acc<T>(acc);
  }
}

// ------------------------------------------------------------------ backward
// Per plane, K = Q + 2 sums: part[plane * K + k] = [g, g uh_0, ..., g uh_{Q-1}, g x (identity)].
template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_partial_kernel(const T* __restrict__ grad, const T* __restrict__ x, ZIn<T> z,
                   const typename AccT<T>::type* __restrict__ mean, const typename AccT<T>::type* __restrict__ rstd,
                   Geom g, int warp_mode, typename AccT<T>::type* __restrict__ part) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  Span s;
  if (!plane_span(g.planes, g.HWo, warp_mode, g.HWo, s)) return;
  const int64_t c = s.plane % g.n;
  const T* xp = x + s.plane * static_cast<int64_t>(g.H) * g.W;
  const T* gp = grad + s.plane * g.HWo;
  A mq[kMaxQ], rq[kMaxQ], acc[kMaxQ + 2];
#pragma unroll
  for (int q = 0; q < kMaxQ; ++q) {
    const bool live = q < g.Q;
    mq[q] = live ? mean[q * g.n + c] : A(0);
    rq[q] = live ? rstd[q * g.n + c] : A(0);
  }
#pragma unroll
  for (int k = 0; k < kMaxQ + 2; ++k) acc[k] = A(0);
  // Two passes over the plane, each accumulator in the same order as one pass would: the
  // pools (whose double division is a subroutine call) with few values live, then the z
  // terms and the identity. One pass spilled registers in double.
  for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) {
    const int oi = static_cast<int>(p) / g.Wo, oj = static_cast<int>(p) - oi * g.Wo;
    A mx, av;
    int arg, cells;
    pool_at(xp, g, oi, oj, mx, av, arg, cells);
    const A gv = to_acc(gp[p]);
    acc[0] += gv;
    acc[1] += gv * ((mx - mq[0]) * rq[0]);
    acc[2] += gv * ((av - mq[1]) * rq[1]);
  }
  for (int64_t p = s.begin + s.rank; p < s.end; p += s.size) {
    const A gv = to_acc(gp[p]);
#pragma unroll
    for (int q = 2; q < kMaxQ; ++q) {
      if (q < g.Q) acc[1 + q] += gv * ((to_acc(z.p[q - 2][s.plane * g.HWo + p]) - mq[q]) * rq[q]);
    }
    if (g.identity) acc[kMaxQ + 1] += gv * to_acc(xp[p]);
  }
  const int K = g.Q + 2;
#pragma unroll
  for (int k = 0; k < kMaxQ + 2; ++k) {
    // acc[kMaxQ + 1] (g x) is stored as column Q + 1
    const bool live = k < g.Q + 1 || k == kMaxQ + 1;
    if (!live) continue;  // uniform over the group
    const A t = group_sum(acc[k], warp_mode, sh);
    const int col = k == kMaxQ + 1 ? g.Q + 1 : k;
    if (s.rank == 0) part[s.plane * K + col] = t;
  }
}

// One thread per (k, c), k in [0, Q]: chan[k * n + c] = mean over (b, p) of column k of the
// partials (k = 0: g; k = 1 + q: g uh_q), planes in b order.
template <typename A>
__global__ void bwd_combine_kernel(const A* __restrict__ part, Geom g, A* __restrict__ chan) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= (g.Q + 1) * g.n) return;
  const int64_t k = t / g.n, c = t - k * g.n;
  const int64_t K = g.Q + 2;
  A S = A(0);
  for (int64_t b = 0; b < g.B; ++b) S += part[(b * g.n + c) * K + k];
  chan[t] = S / A(g.B * g.HWo);
}

// Block k in [0, Q]: the gradient of v_k (k < Q: column 1 + k of the partials, into
// dpool_weights[k] or dz_weights[k - 2]) or of wi (k = Q: column Q + 1, 0 without the
// identity), summed over the planes in a fixed order (deterministic).
template <typename T>
__global__ void dw_kernel(const typename AccT<T>::type* __restrict__ part, Geom g, T* __restrict__ dpool,
                          T* __restrict__ dzw, T* __restrict__ did) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  const int k = blockIdx.x;
  const int col = k < g.Q ? 1 + k : (g.identity ? g.Q + 1 : -1);
  const int64_t K = g.Q + 2;
  A v = A(0);
  if (col >= 0) {
    for (int64_t i = threadIdx.x; i < g.planes; i += blockDim.x) v += part[i * K + col];
  }
  v = block_sum(v, sh);
  if (threadIdx.x == 0) {
    T* out = k < 2 ? dpool + k : (k < g.Q ? dzw + (k - 2) : did);
    *out = from_acc<T>(v);
  }
}

// The statistics of the backward, read by bwd_du_kernel and bwd_dx_kernel.
template <typename T> struct BwdStats {
  const typename AccT<T>::type* mean;  // (Q, n)
  const typename AccT<T>::type* rstd;  // (Q, n)
  const typename AccT<T>::type* chan;  // (Q + 1, n): channel means of g, g uh_q (training)
  int training;
};

// du_q at an output of channel c with gradient gv, for the value u of u_q.
template <typename T>
__device__ __forceinline__ typename AccT<T>::type du_of(const Weights<T>& w, const BwdStats<T>& st, const Geom& g,
                                                        int q, int64_t c, typename AccT<T>::type gv,
                                                        typename AccT<T>::type u) {
  using A = typename AccT<T>::type;
  const int64_t k = q * g.n + c;
  const A r = st.rstd[k];
  const A coef = weight_of(w, q) * r;
  if (!st.training) return gv * coef;
  const A gm = st.chan[c];
  const A uh = (u - st.mean[k]) * r;
  return (gv - gm - uh * st.chan[(1 + q) * g.n + c]) * coef;
}

// One thread per output element: dz[i] = du_{2+i}; du1 = du_1 / cells into the workspace
// (for bwd_dx_kernel; du_0 is recomputed there, for the window maxima only).
template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_du_kernel(const T* __restrict__ grad, const T* __restrict__ x, ZIn<T> z, Weights<T> w, BwdStats<T> st, Geom g,
              ZOut<T> dz, typename AccT<T>::type* __restrict__ du1) {
  using A = typename AccT<T>::type;
  const int64_t total = g.planes * g.HWo;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / g.HWo, c = plane % g.n;
    const int p = static_cast<int>(e - plane * g.HWo);
    const int oi = p / g.Wo, oj = p - oi * g.Wo;
    A mx, av;
    int arg, cells;
    pool_at(x + plane * static_cast<int64_t>(g.H) * g.W, g, oi, oj, mx, av, arg, cells);
    const A gv = to_acc(grad[e]);
    du1[e] = du_of(w, st, g, 1, c, gv, av) / A(cells);
#pragma unroll
    for (int q = 2; q < kMaxQ; ++q) {
      if (q < g.Q) dz.p[q - 2][e] = from_acc<T>(du_of(w, st, g, q, c, gv, to_acc(z.p[q - 2][e])));
    }
  }
}

// One thread per input element (grid-stride): the outputs whose window holds (ih, iw), in
// row-major order: dx = sum du_0 where it is the window maximum (du_0 = du(0, x[e]) there,
// the maximum being x[e] itself) + sum du1 (+ wi g; wi nullptr: none).
template <typename T>
__global__ void __launch_bounds__(kThreads)
bwd_dx_kernel(const T* __restrict__ grad, const T* __restrict__ x, Weights<T> w, BwdStats<T> st,
              const typename AccT<T>::type* __restrict__ du1, Geom g, T* __restrict__ dx) {
  using A = typename AccT<T>::type;
  const T* __restrict__ wi = w.id;
  const int64_t HW = static_cast<int64_t>(g.H) * g.W;
  const int64_t total = g.planes * HW;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / HW, c = plane % g.n;
    const int idx = static_cast<int>(e - plane * HW);
    const int ih = idx / g.W, iw = idx - ih * g.W;
    const T* xp = x + plane * HW;
    const A xv = to_acc(xp[idx]);
    // outputs o with s*o - 1 <= i <= s*o + 1, 0 <= o < Lo
    const int oi0 = ih <= 1 ? 0 : (ih + g.stride - 2) / g.stride, oi1 = min((ih + 1) / g.stride, g.Ho - 1);
    const int oj0 = iw <= 1 ? 0 : (iw + g.stride - 2) / g.stride, oj1 = min((iw + 1) / g.stride, g.Wo - 1);
    const int64_t base = plane * g.HWo;
    A dmax = A(0), davg = A(0);
    for (int oi = oi0; oi <= oi1; ++oi) {
      for (int oj = oj0; oj <= oj1; ++oj) {
        const int64_t o = base + oi * g.Wo + oj;
        if (is_window_max(xp, g, oi, oj, idx, xv)) dmax += du_of(w, st, g, 0, c, to_acc(grad[o]), xv);
        davg += du1[o];
      }
    }
    A v = dmax + davg;
    if (wi != nullptr) v = v + to_acc(*wi) * to_acc(grad[e]);  // the identity (stride 1: grad plane == x plane)
    dx[e] = from_acc<T>(v);
  }
}

// ------------------------------------------------------------------ host side
inline bool make_geom(int64_t B, int64_t n, int64_t H, int64_t W, int stride, int P, bool identity, Geom& g) {
  if (B < 0 || n < 0 || H < 1 || W < 1 || H * W > kMaxPlane || (stride != 1 && stride != 2)) return false;
  if (n > kMaxChannels || B * n > kMaxPlanes) return false;
  if (stride == 2 && (H % 2 != 0 || W % 2 != 0)) return false;
  if (P < 0 || P > kMaxZ || (identity && stride != 1)) return false;
  g.B = B;
  g.n = n;
  g.planes = B * n;
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.Ho = static_cast<int>(H / stride);
  g.Wo = static_cast<int>(W / stride);
  g.HWo = static_cast<int64_t>(g.Ho) * g.Wo;
  g.stride = stride;
  g.P = P;
  g.Q = P + 2;
  g.identity = identity ? 1 : 0;
  return true;
}

// Blocks of kThreads for `count` threads of a grid-stride loop (at least one block).
inline unsigned elementwise_blocks(int64_t count) {
  const int64_t b = ceil_div(count > 0 ? count : 1, kThreads);
  return static_cast<unsigned>(b < (int64_t(1) << 20) ? b : (int64_t(1) << 20));
}

// Workspace carving: consecutive 256-byte aligned pieces.
struct Carve {
  char* at;
  template <typename U> U* take(size_t count) {
    U* p = reinterpret_cast<U*>(at);
    at += round_up(count * sizeof(U));
    return p;
  }
};

inline size_t fwd_ws_bytes(size_t acc, int64_t planes, int64_t n, int Q) {
  return 2 * round_up(static_cast<size_t>(planes > 0 ? planes : 1) * Q * acc) +
         round_up(static_cast<size_t>(n > 0 ? n : 1) * Q * acc);
}

inline size_t bwd_ws_bytes(size_t acc, int64_t planes, int64_t n, int64_t HWo, int Q) {
  const size_t outs = static_cast<size_t>(planes * HWo > 0 ? planes * HWo : 1);
  const size_t nn = static_cast<size_t>(n > 0 ? n : 1);
  return round_up(static_cast<size_t>(planes > 0 ? planes : 1) * (Q + 2) * acc) +  // part
         round_up(nn * (Q + 1) * acc) +                                            // chan
         round_up(nn * Q * acc) +                                                  // rstd
         round_up(outs * acc);                                                     // du1
}

template <typename T>
int mixed_fwd_impl(const void* const* z, int P, const T* x, Weights<T> w, int64_t B, int64_t n, int64_t H,
                   int64_t W, int stride, double eps, int training, typename AccT<T>::type* mean,
                   typename AccT<T>::type* var, T* y, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  Geom g;
  if (!make_geom(B, n, H, W, stride, P, w.id != nullptr, g)) return static_cast<int>(cudaErrorInvalidValue);
  ZIn<T> zin{};
  for (int k = 0; k < g.P; ++k) zin.p[k] = static_cast<const T*>(z[k]);
  Carve cv{static_cast<char*>(workspace)};
  A* part_sum = cv.take<A>(static_cast<size_t>(g.planes > 0 ? g.planes : 1) * g.Q);
  A* part_m2 = cv.take<A>(static_cast<size_t>(g.planes > 0 ? g.planes : 1) * g.Q);
  A* rstd = cv.take<A>(static_cast<size_t>(n > 0 ? n : 1) * g.Q);
  const int64_t Qn = g.Q * g.n;
  if (Qn == 0) return 0;  // n == 0: nothing to compute
  if (training) {
    if (g.planes > 0) {
      const PlaneLaunch L = plane_launch(g.planes, g.HWo, /*tiled=*/false);
      if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
      stats_kernel<T><<<L.grid, L.block, 0, stream>>>(x, zin, g, L.warp_mode, part_sum, part_m2);
      ADARTS_LAUNCH_CHECK();
    }
    stats_combine_kernel<A><<<elementwise_blocks(Qn), kThreads, 0, stream>>>(part_sum, part_m2, g, mean, var);
    ADARTS_LAUNCH_CHECK();
  }
  rstd_kernel<A><<<elementwise_blocks(Qn), kThreads, 0, stream>>>(var, Qn, static_cast<A>(eps), rstd);
  ADARTS_LAUNCH_CHECK();
  const int64_t total = g.planes * g.HWo;
  if (total > 0) {
    fwd_y_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(x, zin, w, mean, rstd, g, y);
    ADARTS_LAUNCH_CHECK();
  }
  return 0;
}

template <typename T>
int mixed_bwd_impl(const T* grad, const void* const* z, int P, const T* x, Weights<T> w,
                   const typename AccT<T>::type* mean, const typename AccT<T>::type* var, int64_t B, int64_t n,
                   int64_t H, int64_t W, int stride, double eps, int training, void* const* dz, T* dx, T* dzw,
                   T* dpool, T* did, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  Geom g;
  if (!make_geom(B, n, H, W, stride, P, w.id != nullptr, g)) return static_cast<int>(cudaErrorInvalidValue);
  ZIn<T> zin{};
  ZOut<T> dzo{};
  for (int k = 0; k < g.P; ++k) {
    zin.p[k] = static_cast<const T*>(z[k]);
    dzo.p[k] = static_cast<T*>(dz[k]);
  }
  const size_t outs = static_cast<size_t>(g.planes * g.HWo > 0 ? g.planes * g.HWo : 1);
  const size_t nn = static_cast<size_t>(n > 0 ? n : 1);
  Carve cv{static_cast<char*>(workspace)};
  A* part = cv.take<A>(static_cast<size_t>(g.planes > 0 ? g.planes : 1) * (g.Q + 2));
  A* chan = cv.take<A>(nn * (g.Q + 1));
  A* rstd = cv.take<A>(nn * g.Q);
  A* du1 = cv.take<A>(outs);
  const int64_t Qn = g.Q * g.n;
  if (Qn > 0) {
    rstd_kernel<A><<<elementwise_blocks(Qn), kThreads, 0, stream>>>(var, Qn, static_cast<A>(eps), rstd);
    ADARTS_LAUNCH_CHECK();
  }
  if (g.planes > 0) {
    const PlaneLaunch L = plane_launch(g.planes, g.HWo, /*tiled=*/false);
    if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
    bwd_partial_kernel<T><<<L.grid, L.block, 0, stream>>>(grad, x, zin, mean, rstd, g, L.warp_mode, part);
    ADARTS_LAUNCH_CHECK();
    if (training) {
      bwd_combine_kernel<A><<<elementwise_blocks((g.Q + 1) * g.n), kThreads, 0, stream>>>(part, g, chan);
      ADARTS_LAUNCH_CHECK();
    }
  }
  // Q + 1 gradients, written even when there are no planes (zeros)
  dw_kernel<T><<<g.Q + 1, kThreads, 0, stream>>>(part, g, dpool, dzw, did);
  ADARTS_LAUNCH_CHECK();
  const int64_t total = g.planes * g.HWo;
  if (total > 0) {
    const BwdStats<T> st{mean, rstd, chan, training};
    bwd_du_kernel<T><<<elementwise_blocks(total), kThreads, 0, stream>>>(grad, x, zin, w, st, g, dzo, du1);
    ADARTS_LAUNCH_CHECK();
    const int64_t inputs = g.planes * static_cast<int64_t>(g.H) * g.W;
    bwd_dx_kernel<T><<<elementwise_blocks(inputs), kThreads, 0, stream>>>(grad, x, w, st, du1, g, dx);
    ADARTS_LAUNCH_CHECK();
  }
  return 0;
}

}  // namespace

size_t mixed_sum_fwd_workspace_bytes(DType dt, int64_t B, int64_t n, int P) {
  return fwd_ws_bytes(acc_size(dt), B * n, n, P + 2);
}

size_t mixed_sum_bwd_workspace_bytes(DType dt, int64_t B, int64_t n, int64_t H, int64_t W, int stride, int P) {
  const int64_t s = stride == 2 ? 2 : 1;
  return bwd_ws_bytes(acc_size(dt), B * n, n, (H / s) * (W / s), P + 2);
}

int mixed_sum_fwd(DType dt, const void* const* z, int P, const void* x, const void* z_weights,
                  const void* pool_weights, const void* identity_weight, int64_t B, int64_t n, int64_t H, int64_t W,
                  int stride, double eps, int training, void* mean, void* var, void* y, void* workspace,
                  cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccT<T>::type;
    const Weights<T> w{static_cast<const T*>(pool_weights), static_cast<const T*>(z_weights),
                       static_cast<const T*>(identity_weight)};
    return mixed_fwd_impl<T>(z, P, static_cast<const T*>(x), w, B, n, H, W, stride, eps, training,
                             static_cast<A*>(mean), static_cast<A*>(var), static_cast<T*>(y), workspace, stream);
  });
}

int mixed_sum_bwd(DType dt, const void* grad, const void* const* z, int P, const void* x, const void* z_weights,
                  const void* pool_weights, const void* identity_weight, const void* mean, const void* var,
                  int64_t B, int64_t n, int64_t H, int64_t W, int stride, double eps, int training,
                  void* const* dz, void* dx, void* dz_weights, void* dpool_weights, void* didentity_weight,
                  void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccT<T>::type;
    const Weights<T> w{static_cast<const T*>(pool_weights), static_cast<const T*>(z_weights),
                       static_cast<const T*>(identity_weight)};
    return mixed_bwd_impl<T>(static_cast<const T*>(grad), z, P, static_cast<const T*>(x), w,
                             static_cast<const A*>(mean), static_cast<const A*>(var), B, n, H, W, stride, eps,
                             training, dz, static_cast<T*>(dx), static_cast<T*>(dz_weights),
                             static_cast<T*>(dpool_weights), static_cast<T*>(didentity_weight), workspace, stream);
  });
}

}  // namespace cuda
}  // namespace adarts
