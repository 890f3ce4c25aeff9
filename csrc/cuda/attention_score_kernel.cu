// CUDA kernels of adarts_C::attention_score_fwd / attention_score_bwd.
//
// Specification: adarts_kernels/ops/reference.py (attention_pools, attention_score_fwd,
// attention_score_bwd). Pipeline, all on `stream`, no host synchronisation:
//
//   forward                                    backward
//   pools:  P = [avg; mx]  (2B, C)             pools (recomputed, with the argmax)
//   GEMM:   Hs = relu(P @ w1^T)  (2B, Ch)      GEMM: Hs = relu(P @ w1^T)
//   GEMM:   a = sigmoid((Hs[:B] + Hs[B:]) @ w2^T)   GEMM: DH = [(dz @ w2) * (Hs > 0)]  (2B, Ch)
//   sum:    s = a.sum(0)  (C,)             GEMM: dw2 = dz^T @ (Hs[:B] + Hs[B:])
//   rank:   idx[rank(c)] = c               GEMM: dw1 = DH^T @ P
//                                          GEMM: D = DH @ w1  (2B, C) = [d_avg; d_mx]
//                                          dx = d_avg / HW (+ d_mx at the first maximum)
//
// dz = grad_a * a * (1 - a) is computed on the fly by the loaders. Every output element is
// produced by exactly one thread with a fixed summation order: bitwise deterministic, no
// atomics. Accumulation in float (double for double).
#include "common.cuh"

#include <climits>
#include <cstdint>

namespace adarts {
namespace cuda {
namespace {

// ------------------------------------------------------------------ accumulator math
// (the element-type helpers, sums, plane mapping and launch helpers are in common.cuh)
__device__ __forceinline__ float acc_exp(float v) { return expf(v); }
__device__ __forceinline__ double acc_exp(double v) { return exp(v); }

// ------------------------------------------------------------------ argmax reductions
// Is (v, i) preferred to (bv, bi) as "the maximum"? NaN above everything, then the larger
// value, then the lower index: a strict total order, so every reduction tree agrees.
template <typename A> __device__ __forceinline__ bool prefer(A v, int i, A bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

template <typename A> __device__ __forceinline__ void warp_argmax(A& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const A ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (prefer(ov, oi, v, i)) { v = ov; i = oi; }
  }
}

template <typename A> __device__ __forceinline__ void block_argmax(A& v, int& i, A* sv, int* si) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  warp_argmax(v, i);
  if (lane == 0) { sv[wid] = v; si[wid] = i; }
  __syncthreads();
  A tv = lane < nw ? sv[lane] : A(-INFINITY);
  int ti = lane < nw ? si[lane] : INT_MAX;
  warp_argmax(tv, ti);
  __syncthreads();
  v = tv; i = ti;
}

// ------------------------------------------------------------------ kernels: pools
// avg[plane] = mean, mx[plane] = max, arg[plane] = flat index of the first maximum (NaN wins).
template <typename T>
__global__ void __launch_bounds__(kThreads)
pools_kernel(const T* __restrict__ x, int64_t planes, int HW, int warp_mode, int vec,
             typename AccT<T>::type* __restrict__ avg, typename AccT<T>::type* __restrict__ mx,
             int* __restrict__ arg) {
  using A = typename AccT<T>::type;
  __shared__ A sh_v[32];
  __shared__ int sh_i[32];
  Span s;
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  if (!plane_span(planes, units, warp_mode, units, s)) return;
  const T* p = x + s.plane * static_cast<int64_t>(HW);
  A sum = A(0), bv = A(-INFINITY);
  int bi = INT_MAX;
  if (vec) {
    constexpr int N = Vec16<T>::N;
    const Vec16<T>* pv = reinterpret_cast<const Vec16<T>*>(p);
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const Vec16<T> w = pv[u];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A e = to_acc(w.v[k]);
        const int i = static_cast<int>(u) * N + k;
        sum += e;
        if (prefer(e, i, bv, bi)) { bv = e; bi = i; }
      }
    }
  } else {
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const A e = to_acc(p[u]);
      sum += e;
      if (prefer(e, static_cast<int>(u), bv, bi)) { bv = e; bi = static_cast<int>(u); }
    }
  }
  if (warp_mode) {
    sum = warp_sum(sum);
    warp_argmax(bv, bi);
  } else {
    sum = block_sum(sum, sh_v);
    block_argmax(bv, bi, sh_v, sh_i);
  }
  if (s.rank == 0) {
    avg[s.plane] = sum / A(HW);
    mx[s.plane] = bv;
    if (arg != nullptr) arg[s.plane] = bi;
  }
}

// ------------------------------------------------------------------ kernels: small GEMM
// out(m, n) = sum_k la(m, k) * lb(k, n), handed to ep(m, n, value). 16x16 output tile per
// block, 16-wide K slabs through shared memory, k summed in increasing order. A loader's
// kSecondContig says which of its two indices walks memory contiguously, so that the tile
// loads are coalesced whatever the operand's layout.
constexpr int TS = 16;
static_assert(TS == kGemmTile, "kernels.h: kGemmTile is the GEMM tile, kMaxGemmRows its row limit");

template <typename A, typename LA, typename LB, typename EP>
__global__ void __launch_bounds__(TS * TS) gemm_kernel(int M, int N, int K, LA la, LB lb, EP ep) {
  __shared__ A As[TS][TS + 1];  // As[m][k]
  __shared__ A Bs[TS][TS + 1];  // Bs[k][n]
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int m0 = blockIdx.y * TS, n0 = blockIdx.x * TS;
  A acc = A(0);
  for (int k0 = 0; k0 < K; k0 += TS) {
    {
      const int mi = LA::kSecondContig ? ty : tx, ki = LA::kSecondContig ? tx : ty;
      const int m = m0 + mi, k = k0 + ki;
      As[mi][ki] = (m < M && k < K) ? la(m, k) : A(0);
    }
    {
      const int ki = LB::kSecondContig ? ty : tx, ni = LB::kSecondContig ? tx : ty;
      const int k = k0 + ki, n = n0 + ni;
      Bs[ki][ni] = (k < K && n < N) ? lb(k, n) : A(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TS; ++kk) acc += As[ty][kk] * Bs[kk][tx];
    __syncthreads();
  }
  const int m = m0 + ty, n = n0 + tx;
  if (m < M && n < N) ep(m, n, acc);
}

// (i, j) -> p[i * ld + j]
template <typename T, typename A> struct RowMajor {
  static constexpr bool kSecondContig = true;
  const T* p;
  int64_t ld;
  __device__ A operator()(int i, int j) const { return static_cast<A>(to_acc(p[i * ld + j])); }
};
// (i, j) -> p[j * ld + i]
template <typename T, typename A> struct ColMajor {
  static constexpr bool kSecondContig = false;
  const T* p;
  int64_t ld;
  __device__ A operator()(int i, int j) const { return static_cast<A>(to_acc(p[j * ld + i])); }
};
// (b, j) -> Hs[b, j] + Hs[B + b, j] = h_avg + h_max
template <typename A> struct HiddenSum {
  static constexpr bool kSecondContig = true;
  const A* hs;
  int64_t B, Ch;
  __device__ A operator()(int b, int j) const { return hs[b * Ch + j] + hs[(B + b) * Ch + j]; }
};
// dz = grad_a * a * (1 - a), as (b, c) (kTransposed = false) or (c, b) (true)
template <typename T, typename A, bool kTransposed> struct Dz {
  static constexpr bool kSecondContig = !kTransposed;
  const T* ga;
  const T* a;
  int64_t C;
  __device__ A operator()(int i, int j) const {
    const int64_t o = kTransposed ? j * C + i : i * C + j;
    const A av = to_acc(a[o]);
    return to_acc(ga[o]) * av * (A(1) - av);
  }
};

template <typename A> struct EpRelu {  // Hs = relu(v); NaN stays NaN like F.relu
  A* out;
  int64_t ld;
  __device__ void operator()(int m, int n, A v) const { out[m * ld + n] = v <= A(0) ? A(0) : v; }
};
template <typename T, typename A> struct EpSigmoid {  // a = sigmoid(z): acc copy + output dtype
  T* a;
  A* a_acc;
  int64_t ld;
  __device__ void operator()(int m, int n, A z) const {
    const A v = A(1) / (A(1) + acc_exp(-z));
    a_acc[m * ld + n] = v;
    a[m * ld + n] = from_acc<T>(v);
  }
};
template <typename A> struct EpMaskHidden {  // DH[v*B + b, j] = g * (Hs[v*B + b, j] > 0)
  const A* hs;
  A* dh;
  int64_t B, Ch;
  __device__ void operator()(int b, int j, A g) const {
    const int64_t o0 = b * Ch + j, o1 = (B + b) * Ch + j;
    dh[o0] = g * A(hs[o0] > A(0) ? 1 : 0);
    dh[o1] = g * A(hs[o1] > A(0) ? 1 : 0);
  }
};
template <typename T, typename A> struct EpStore {
  T* out;
  int64_t ld;
  __device__ void operator()(int m, int n, A v) const { out[m * ld + n] = from_acc<T>(v); }
};
template <typename A> struct EpStoreAcc {
  A* out;
  int64_t ld;
  __device__ void operator()(int m, int n, A v) const { out[m * ld + n] = v; }
};

template <typename A, typename LA, typename LB, typename EP>
inline void launch_gemm(int M, int N, int K, LA la, LB lb, EP ep, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, TS)), static_cast<unsigned>(ceil_div(M, TS)));
  gemm_kernel<A, LA, LB, EP><<<grid, dim3(TS, TS), 0, stream>>>(M, N, K, la, lb, ep);
}

// ------------------------------------------------------------------ kernels: top-k
// s[c] = sum_b a[b, c], b in increasing order.
template <typename A>
__global__ void score_sum_kernel(const A* __restrict__ a, int64_t B, int C, A* __restrict__ s) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  A t = A(0);
  for (int64_t b = 0; b < B; ++b) t += a[b * C + c];
  s[c] = t;
}

// rank(c) = #{c' preferred to c}: NaN first, larger score first, equal scores by lower
// channel; a permutation of [0, C). idx[rank(c)] = c for rank(c) < n. O(C^2) comparisons
// spread over ceil(C / 256) blocks; s staged in shared memory when it fits.
template <typename A>
__global__ void __launch_bounds__(kThreads)
rank_kernel(const A* __restrict__ s_glob, int C, int n, int use_smem, int64_t* __restrict__ idx) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const A* s = s_glob;
  if (use_smem) {
    A* sm = reinterpret_cast<A*>(smem_raw);
    for (int k = threadIdx.x; k < C; k += blockDim.x) sm[k] = s_glob[k];
    __syncthreads();
    s = sm;
  }
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const A v = s[c];
  int r = 0;
#pragma unroll 4
  for (int k = 0; k < C; ++k) r += prefer(s[k], k, v, c) ? 1 : 0;
  if (r < n) idx[r] = c;
}

// ------------------------------------------------------------------ kernels: dx
// dx[plane, i] = d_avg[plane] / HW + (i == arg[plane] ? d_mx[plane] : 0)
template <typename T>
__global__ void __launch_bounds__(kThreads)
score_dx_kernel(const typename AccT<T>::type* __restrict__ d, const int* __restrict__ arg, int64_t planes, int HW,
                int warp_mode, int vec, int64_t tile, T* __restrict__ dx) {
  using A = typename AccT<T>::type;
  Span s;
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  if (!plane_span(planes, units, warp_mode, tile, s)) return;
  const A da = d[s.plane] / A(HW), dm = d[planes + s.plane];
  const int am = arg[s.plane];
  T* out = dx + s.plane * static_cast<int64_t>(HW);
  if (vec) {
    constexpr int N = Vec16<T>::N;
    Vec16<T>* ov = reinterpret_cast<Vec16<T>*>(out);
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      Vec16<T> w;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const int i = static_cast<int>(u) * N + k;
        w.v[k] = from_acc<T>(i == am ? da + dm : da);
      }
      ov[u] = w;
    }
  } else {
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size)
      out[u] = from_acc<T>(static_cast<int>(u) == am ? da + dm : da);
  }
}

// ------------------------------------------------------------------ workspace
struct Carver {
  char* base;
  size_t off;
  template <typename P> P* take(size_t count) {
    P* p = reinterpret_cast<P*>(base + off);
    off += round_up(count * sizeof(P));
    return p;
  }
};

size_t fwd_bytes(size_t as, int64_t B, int64_t C, int64_t Ch) {
  return round_up(2 * B * C * as) + round_up(2 * B * Ch * as) + round_up(B * C * as) + round_up(C * as);
}
size_t bwd_bytes(size_t as, int64_t B, int64_t C, int64_t Ch) {
  return round_up(2 * B * C * as) + round_up(B * C * sizeof(int)) + 2 * round_up(2 * B * Ch * as) +
         round_up(2 * B * C * as);
}

inline bool sizes_ok(int64_t B, int64_t C, int64_t HW, int64_t Ch) {
  // int-indexed planes / channels (kernels.h); GEMM grids have at most kMaxGridY rows of TS-row tiles.
  return B >= 0 && C >= 0 && HW >= 1 && Ch >= 0 && C <= kMaxChannels && HW <= kMaxPlane && Ch <= kMaxChannels &&
         2 * B <= kMaxGemmRows && C <= kMaxGemmRows && Ch <= kMaxGemmRows && B * C <= kMaxPlanes;
}

// ------------------------------------------------------------------ launchers
template <typename T>
int launch_pools(const T* x, int64_t planes, int HW, typename AccT<T>::type* avg, typename AccT<T>::type* mx,
                 int* arg, cudaStream_t stream) {
  const bool vec = aligned_to(x, 16) && HW % Vec16<T>::N == 0;
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  const PlaneLaunch L = plane_launch(planes, units, /*tiled=*/false);
  if (planes == 0) return 0;
  if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
  pools_kernel<T><<<L.grid, L.block, 0, stream>>>(x, planes, HW, L.warp_mode, vec ? 1 : 0, avg, mx, arg);
  ADARTS_LAUNCH_CHECK();
  return 0;
}

template <typename T>
int score_fwd_impl(const T* x, const T* w1, const T* w2, int64_t B, int64_t C, int64_t HW, int64_t Ch,
                   int64_t n, T* a, int64_t* idx, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  if (!sizes_ok(B, C, HW, Ch) || n < 0 || n > C) return static_cast<int>(cudaErrorInvalidValue);
  Carver w{static_cast<char*>(workspace), 0};
  A* P = w.take<A>(2 * B * C);
  A* Hs = w.take<A>(2 * B * Ch);
  A* a_acc = w.take<A>(B * C);
  A* s = w.take<A>(C);
  const int iB = static_cast<int>(B), iC = static_cast<int>(C), iCh = static_cast<int>(Ch);

  if (B > 0 && C > 0) {
    int err = launch_pools<T>(x, B * C, static_cast<int>(HW), P, P + B * C, nullptr, stream);
    if (err) return err;
    // Hs = relu(P @ w1^T): (2B, Ch), K = C
    launch_gemm<A>(2 * iB, iCh, iC, RowMajor<A, A>{P, C}, ColMajor<T, A>{w1, C}, EpRelu<A>{Hs, Ch}, stream);
    ADARTS_LAUNCH_CHECK();
    // a = sigmoid((h_avg + h_max) @ w2^T): (B, C), K = Ch
    launch_gemm<A>(iB, iC, iCh, HiddenSum<A>{Hs, B, Ch}, ColMajor<T, A>{w2, Ch}, EpSigmoid<T, A>{a, a_acc, C},
                   stream);
    ADARTS_LAUNCH_CHECK();
  }
  if (C > 0) {
    score_sum_kernel<A><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(a_acc, B, iC, s);
    ADARTS_LAUNCH_CHECK();
  }
  if (n > 0) {
    const size_t smem = static_cast<size_t>(C) * sizeof(A);
    const bool use_smem = smem <= 48 * 1024;
    rank_kernel<A><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, use_smem ? smem : 0, stream>>>(
        s, iC, static_cast<int>(n), use_smem ? 1 : 0, idx);
    ADARTS_LAUNCH_CHECK();
  }
  return 0;
}

template <typename T>
int score_bwd_impl(const T* ga, const T* x, const T* w1, const T* w2, const T* a, int64_t B, int64_t C,
                   int64_t HW, int64_t Ch, T* dx, T* dw1, T* dw2, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  if (!sizes_ok(B, C, HW, Ch)) return static_cast<int>(cudaErrorInvalidValue);
  Carver w{static_cast<char*>(workspace), 0};
  A* P = w.take<A>(2 * B * C);
  int* arg = w.take<int>(B * C);
  A* Hs = w.take<A>(2 * B * Ch);
  A* DH = w.take<A>(2 * B * Ch);
  A* D = w.take<A>(2 * B * C);
  const int iB = static_cast<int>(B), iC = static_cast<int>(C), iCh = static_cast<int>(Ch);

  if (B > 0 && C > 0) {
    int err = launch_pools<T>(x, B * C, static_cast<int>(HW), P, P + B * C, arg, stream);
    if (err) return err;
    launch_gemm<A>(2 * iB, iCh, iC, RowMajor<A, A>{P, C}, ColMajor<T, A>{w1, C}, EpRelu<A>{Hs, Ch}, stream);
    ADARTS_LAUNCH_CHECK();
    // G = dz @ w2: (B, Ch), K = C; DH = [G * (h_avg > 0); G * (h_max > 0)]
    launch_gemm<A>(iB, iCh, iC, Dz<T, A, false>{ga, a, C}, RowMajor<T, A>{w2, Ch}, EpMaskHidden<A>{Hs, DH, B, Ch},
                   stream);
    ADARTS_LAUNCH_CHECK();
  }
  // dw2 = dz^T @ (h_avg + h_max): (C, Ch), K = B (zeros when B == 0)
  launch_gemm<A>(iC, iCh, iB, Dz<T, A, true>{ga, a, C}, HiddenSum<A>{Hs, B, Ch}, EpStore<T, A>{dw2, Ch}, stream);
  ADARTS_LAUNCH_CHECK();
  // dw1 = DH^T @ P = dh_avg^T avg + dh_max^T mx: (Ch, C), K = 2B
  launch_gemm<A>(iCh, iC, 2 * iB, ColMajor<A, A>{DH, Ch}, RowMajor<A, A>{P, C}, EpStore<T, A>{dw1, C}, stream);
  ADARTS_LAUNCH_CHECK();
  if (B > 0 && C > 0) {
    // D = DH @ w1 = [d_avg; d_mx]: (2B, C), K = Ch
    launch_gemm<A>(2 * iB, iC, iCh, RowMajor<A, A>{DH, Ch}, RowMajor<T, A>{w1, C}, EpStoreAcc<A>{D, C}, stream);
    ADARTS_LAUNCH_CHECK();
    const int64_t planes = B * C;
    const bool vec = aligned_to(dx, 16) && HW % Vec16<T>::N == 0;
    const int64_t units = vec ? HW / Vec16<T>::N : HW;
    const PlaneLaunch L = plane_launch(planes, units, /*tiled=*/true);
    if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
    score_dx_kernel<T><<<L.grid, L.block, 0, stream>>>(D, arg, planes, static_cast<int>(HW), L.warp_mode,
                                                        vec ? 1 : 0, L.tile, dx);
    ADARTS_LAUNCH_CHECK();
  }
  return 0;
}

}  // namespace

size_t attention_score_fwd_workspace_bytes(DType dt, int64_t B, int64_t C, int64_t Ch) {
  return fwd_bytes(acc_size(dt), B, C, Ch);
}

size_t attention_score_bwd_workspace_bytes(DType dt, int64_t B, int64_t C, int64_t Ch) {
  return bwd_bytes(acc_size(dt), B, C, Ch);
}

int attention_score_fwd(DType dt, const void* x, const void* w1, const void* w2, int64_t B, int64_t C,
                        int64_t HW, int64_t Ch, int64_t n_select, void* a, int64_t* idx, void* workspace,
                        cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return score_fwd_impl<T>(static_cast<const T*>(x), static_cast<const T*>(w1), static_cast<const T*>(w2), B, C,
                             HW, Ch, n_select, static_cast<T*>(a), idx, workspace, stream);
  });
}

int attention_score_bwd(DType dt, const void* grad_a, const void* x, const void* w1, const void* w2,
                        const void* a, int64_t B, int64_t C, int64_t HW, int64_t Ch, void* dx, void* dw1,
                        void* dw2, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return score_bwd_impl<T>(static_cast<const T*>(grad_a), static_cast<const T*>(x), static_cast<const T*>(w1),
                             static_cast<const T*>(w2), static_cast<const T*>(a), B, C, HW, Ch, static_cast<T*>(dx),
                             static_cast<T*>(dw1), static_cast<T*>(dw2), workspace, stream);
  });
}

}  // namespace cuda
}  // namespace adarts
