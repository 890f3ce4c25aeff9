// CUDA kernels of adarts_C::attention_writeback_fwd / attention_writeback_bwd.
//
// Specification: adarts_kernels/ops/reference.py (_base, attention_writeback_fwd/bwd), with
// m = x (stride 1) or maxpool2x2(x) (stride 2: the first maximum of each window in row-major
// order; a NaN wins, the window's last NaN, like F.max_pool2d), bt = beta (1 when None):
//   forward   out[b, c] = bt * y[b, j]          for c = idx[j]
//             out[b, c] = bt * (m[b, c] * a[b, c])  otherwise                  (B, C, Ho, Wo)
//   backward  selected c = idx[j]:  dy[b, j] = bt * grad[b, c], dx[b, c] = 0, da[b, c] = 0
//             other c:  dx = bt * a * grad routed through the pooling, da = bt * sum(grad * m)
//             dbeta = sum over other c of (grad * m) * a  +  sum over selected of grad * y
// One group (a warp for small planes, else a block) per (b, c) plane of the full-size
// tensor; selected channels found through the inverse map inv[c] = j (or -1) built on the
// device. The beta gradient is reduced deterministically: one partial per plane, then one
// block sums the partials in a fixed order (no atomics). Accumulation in float (double for
// double). Vector accesses: 16 bytes at stride 1, 4-wide input rows / 2-wide outputs at
// stride 2, when the alignment allows.
#include "common.cuh"

#include <cassert>
#include <climits>
#include <cstdint>

namespace adarts {
namespace cuda {
namespace {

// (the element-type helpers, sums, plane mapping and launch helpers are in common.cuh)

// ------------------------------------------------------------------ vectors
// N consecutive T in one aligned access.
template <typename T, int N> struct alignas(sizeof(T) * N) VecN {
  T v[N];
};

// ------------------------------------------------------------------ 2x2 window maximum
// Max of a 2x2 window given in row-major order: strict '>' keeps the first maximum; a NaN
// is taken as the maximum, the last NaN of the window (as F.max_pool2d, CPU and CUDA, and
// the C++ CPU kernel); a window of -inf gives its first position.
template <typename A> __device__ __forceinline__ bool beats(A v, A m) { return v > m || v != v; }

template <typename A> __device__ __forceinline__ int window_argmax(A v0, A v1, A v2, A v3, A& m) {
  int p = 0;
  m = v0;
  if (beats(v1, m)) { m = v1; p = 1; }
  if (beats(v2, m)) { m = v2; p = 2; }
  if (beats(v3, m)) { m = v3; p = 3; }
  return p;
}

// Geometry shared by the kernels.
struct Geom {
  int64_t C, n, planes;
  int64_t H, W, Ho, Wo;
  int stride;
  int vec;  // stride 1: 16-byte units; stride 2: two outputs (4-wide input rows) per unit
};

template <typename T> __device__ __forceinline__ int64_t plane_units(const Geom& g) {
  const int64_t out = g.Ho * g.Wo;
  if (g.stride == 1) return g.vec ? out / Vec16<T>::N : out;
  return g.vec ? out / 2 : out;
}

// Names this operator in the device-side messages of the inverse map (common.cuh).
struct WritebackOp {
  __device__ static const char* name() { return "attention_writeback"; }
};

// ------------------------------------------------------------------ kernels
template <typename T>
__global__ void __launch_bounds__(kThreads)
writeback_fwd_kernel(const T* __restrict__ x, const T* __restrict__ a, const int* __restrict__ inv,
                     const T* __restrict__ y, const T* __restrict__ beta, Geom g, int warp_mode, int64_t tile,
                     T* __restrict__ out) {
  using A = typename AccT<T>::type;
  Span s;
  const int64_t units = plane_units<T>(g);
  if (!plane_span(g.planes, units, warp_mode, tile, s)) return;
  const int64_t b = s.plane / g.C, c = s.plane - b * g.C;
  const int j = inv[c];
  const A bt = beta != nullptr ? to_acc(*beta) : A(1);
  const int64_t osz = g.Ho * g.Wo;
  const int wo_n = static_cast<int>(g.Wo);  // planes are < 2^31 elements
  T* o = out + s.plane * osz;
  if (j >= 0) {  // out = bt * y
    const T* yp = y + (b * g.n + j) * osz;
    if (g.stride == 1 && g.vec) {
      constexpr int N = Vec16<T>::N;
      using V = VecN<T, N>;
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const V w = reinterpret_cast<const V*>(yp)[u];
        V r;
#pragma unroll
        for (int k = 0; k < N; ++k) r.v[k] = from_acc<T>(to_acc(w.v[k]) * bt);
        reinterpret_cast<V*>(o)[u] = r;
      }
    } else if (g.vec) {  // stride 2, pairs
      using V = VecN<T, 2>;
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const V w = reinterpret_cast<const V*>(yp)[u];
        V r;
        r.v[0] = from_acc<T>(to_acc(w.v[0]) * bt);
        r.v[1] = from_acc<T>(to_acc(w.v[1]) * bt);
        reinterpret_cast<V*>(o)[u] = r;
      }
    } else {
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) o[u] = from_acc<T>(to_acc(yp[u]) * bt);
    }
    return;
  }
  const A av = to_acc(a[s.plane]);
  const T* xp = x + s.plane * g.H * g.W;
  if (g.stride == 1) {  // out = (x * a) * bt
    if (g.vec) {
      constexpr int N = Vec16<T>::N;
      using V = VecN<T, N>;
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const V w = reinterpret_cast<const V*>(xp)[u];
        V r;
#pragma unroll
        for (int k = 0; k < N; ++k) r.v[k] = from_acc<T>(to_acc(w.v[k]) * av * bt);
        reinterpret_cast<V*>(o)[u] = r;
      }
    } else {
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) o[u] = from_acc<T>(to_acc(xp[u]) * av * bt);
    }
    return;
  }
  // stride 2: out = (maxpool2x2(x) * a) * bt
  if (g.vec) {
    using V4 = VecN<T, 4>;
    using V2 = VecN<T, 2>;
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const int op = 2 * static_cast<int>(u), ho = op / wo_n, wo = op - ho * wo_n;  // 32-bit division
      const T* r0 = xp + 2 * ho * g.W + 2 * wo;
      const V4 p = *reinterpret_cast<const V4*>(r0);
      const V4 q = *reinterpret_cast<const V4*>(r0 + g.W);
      A m0, m1;
      window_argmax(to_acc(p.v[0]), to_acc(p.v[1]), to_acc(q.v[0]), to_acc(q.v[1]), m0);
      window_argmax(to_acc(p.v[2]), to_acc(p.v[3]), to_acc(q.v[2]), to_acc(q.v[3]), m1);
      V2 r;
      r.v[0] = from_acc<T>(m0 * av * bt);
      r.v[1] = from_acc<T>(m1 * av * bt);
      reinterpret_cast<V2*>(o)[u] = r;
    }
  } else {
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const int ho = static_cast<int>(u) / wo_n, wo = static_cast<int>(u) - ho * wo_n;
      const T* r0 = xp + 2 * ho * g.W + 2 * wo;
      A m;
      window_argmax(to_acc(r0[0]), to_acc(r0[1]), to_acc(r0[g.W]), to_acc(r0[g.W + 1]), m);
      o[u] = from_acc<T>(m * av * bt);
    }
  }
}

// One group per (b, c) plane of x (the whole plane: da and the beta partial have one owner).
template <typename T>
__global__ void __launch_bounds__(kThreads)
writeback_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ a,
                     const int* __restrict__ inv, const T* __restrict__ y, const T* __restrict__ beta, Geom g,
                     int warp_mode, T* __restrict__ dx, T* __restrict__ da, T* __restrict__ dy,
                     typename AccT<T>::type* __restrict__ partial) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  Span s;
  const int64_t units = plane_units<T>(g);
  if (!plane_span(g.planes, units, warp_mode, units, s)) return;
  const int64_t b = s.plane / g.C, c = s.plane - b * g.C;
  const int j = inv[c];  // group-uniform
  const bool sel = j >= 0;
  const A bt = beta != nullptr ? to_acc(*beta) : A(1);
  const A av = to_acc(a[s.plane]);
  const int64_t osz = g.Ho * g.Wo, isz = g.H * g.W;
  const int wo_n = static_cast<int>(g.Wo);  // planes are < 2^31 elements
  const T* gp = grad + s.plane * osz;
  const T* xp = x + s.plane * isz;
  T* dxp = dx + s.plane * isz;
  const T* yp = sel ? y + (b * g.n + j) * osz : nullptr;
  T* dyp = sel ? dy + (b * g.n + j) * osz : nullptr;
  const T zero = from_acc<T>(A(0));
  A s1 = A(0), s2 = A(0);  // s1: sum grad*m (other) or grad*y (selected); s2: sum (grad*m)*a

  if (g.stride == 1) {
    if (g.vec) {
      constexpr int N = Vec16<T>::N;
      using V = VecN<T, N>;
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const V gw = reinterpret_cast<const V*>(gp)[u];
        V r;
        if (sel) {
          const V yw = reinterpret_cast<const V*>(yp)[u];
          V z;
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const A ge = to_acc(gw.v[k]);
            r.v[k] = from_acc<T>(ge * bt);
            s1 += ge * to_acc(yw.v[k]);
            z.v[k] = zero;
          }
          reinterpret_cast<V*>(dyp)[u] = r;
          reinterpret_cast<V*>(dxp)[u] = z;
        } else {
          const V xw = reinterpret_cast<const V*>(xp)[u];
#pragma unroll
          for (int k = 0; k < N; ++k) {
            const A ge = to_acc(gw.v[k]);
            const A gm = ge * to_acc(xw.v[k]);
            r.v[k] = from_acc<T>(ge * av * bt);
            s1 += gm;
            s2 += gm * av;
          }
          reinterpret_cast<V*>(dxp)[u] = r;
        }
      }
    } else {
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const A ge = to_acc(gp[u]);
        if (sel) {
          dyp[u] = from_acc<T>(ge * bt);
          s1 += ge * to_acc(yp[u]);
          dxp[u] = zero;
        } else {
          const A gm = ge * to_acc(xp[u]);
          dxp[u] = from_acc<T>(ge * av * bt);
          s1 += gm;
          s2 += gm * av;
        }
      }
    }
  } else {
    if (g.vec) {  // two outputs per unit: 4-wide rows of x and dx, pairs of grad / y / dy
      using V4 = VecN<T, 4>;
      using V2 = VecN<T, 2>;
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const int op = 2 * static_cast<int>(u), ho = op / wo_n, wo = op - ho * wo_n;  // 32-bit division
        const int64_t r0 = 2 * ho * g.W + 2 * wo;
        const V2 gw = reinterpret_cast<const V2*>(gp)[u];
        const A g0 = to_acc(gw.v[0]), g1 = to_acc(gw.v[1]);
        V4 d0, d1;
#pragma unroll
        for (int k = 0; k < 4; ++k) { d0.v[k] = zero; d1.v[k] = zero; }
        if (sel) {
          const V2 yw = reinterpret_cast<const V2*>(yp)[u];
          V2 r;
          r.v[0] = from_acc<T>(g0 * bt);
          r.v[1] = from_acc<T>(g1 * bt);
          s1 += g0 * to_acc(yw.v[0]);
          s1 += g1 * to_acc(yw.v[1]);
          reinterpret_cast<V2*>(dyp)[u] = r;
        } else {
          const V4 p = *reinterpret_cast<const V4*>(xp + r0);
          const V4 q = *reinterpret_cast<const V4*>(xp + r0 + g.W);
          A m0, m1;
          const int k0 = window_argmax(to_acc(p.v[0]), to_acc(p.v[1]), to_acc(q.v[0]), to_acc(q.v[1]), m0);
          const int k1 = window_argmax(to_acc(p.v[2]), to_acc(p.v[3]), to_acc(q.v[2]), to_acc(q.v[3]), m1);
          const T v0 = from_acc<T>(g0 * av * bt), v1 = from_acc<T>(g1 * av * bt);
          // window position k: row k >> 1, column k & 1 (+ 2 for the second output); selects,
          // not indexed stores, so that d0 / d1 stay in registers
#pragma unroll
          for (int k = 0; k < 2; ++k) {
            if (k0 == k) d0.v[k] = v0;
            if (k0 == k + 2) d1.v[k] = v0;
            if (k1 == k) d0.v[k + 2] = v1;
            if (k1 == k + 2) d1.v[k + 2] = v1;
          }
          const A gm0 = g0 * m0, gm1 = g1 * m1;
          s1 += gm0;
          s2 += gm0 * av;
          s1 += gm1;
          s2 += gm1 * av;
        }
        *reinterpret_cast<V4*>(dxp + r0) = d0;
        *reinterpret_cast<V4*>(dxp + r0 + g.W) = d1;
      }
    } else {
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
        const int ho = static_cast<int>(u) / wo_n, wo = static_cast<int>(u) - ho * wo_n;
        const int64_t r0 = 2 * ho * g.W + 2 * wo;
        const A ge = to_acc(gp[u]);
        int k = -1;  // window position of the maximum, -1: none (selected channel)
        T v = zero;
        if (sel) {
          dyp[u] = from_acc<T>(ge * bt);
          s1 += ge * to_acc(yp[u]);
        } else {
          A m;
          k = window_argmax(to_acc(xp[r0]), to_acc(xp[r0 + 1]), to_acc(xp[r0 + g.W]), to_acc(xp[r0 + g.W + 1]), m);
          v = from_acc<T>(ge * av * bt);
          const A gm = ge * m;
          s1 += gm;
          s2 += gm * av;
        }
        dxp[r0] = k == 0 ? v : zero;
        dxp[r0 + 1] = k == 1 ? v : zero;
        dxp[r0 + g.W] = k == 2 ? v : zero;
        dxp[r0 + g.W + 1] = k == 3 ? v : zero;
      }
    }
    // Cells outside every window (odd H: the last row; odd W: the last column): zero.
    const int64_t tail_col = (g.W & 1) ? 2 * g.Ho : 0, tail_row = (g.H & 1) ? g.W : 0;
    for (int64_t t = s.rank; t < tail_col + tail_row; t += s.size) {
      if (t < tail_col) dxp[t * g.W + g.W - 1] = zero;
      else dxp[(g.H - 1) * g.W + (t - tail_col)] = zero;
    }
  }

  if (warp_mode) {
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
  } else {
    s1 = block_sum(s1, sh);
    s2 = block_sum(s2, sh);
  }
  if (s.rank == 0) {
    da[s.plane] = sel ? zero : from_acc<T>(s1 * bt);
    if (partial != nullptr) partial[s.plane] = sel ? s1 : s2;
  }
}

// dbeta = sum of the per-plane partials, in a fixed order (one block).
template <typename T>
__global__ void dbeta_kernel(const typename AccT<T>::type* __restrict__ partial, int64_t count, T* __restrict__ dbeta) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  A s = A(0);
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) *dbeta = from_acc<T>(s);
}

inline bool sizes_ok(int64_t B, int64_t C, int64_t H, int64_t W, int64_t n, int stride) {
  return B >= 0 && C >= 0 && H >= 0 && W >= 0 && n >= 0 && n <= C && C <= kMaxChannels && H * W <= kMaxPlane &&
         B * C <= kMaxPlanes &&
         (stride == 1 || stride == 2);
}

inline Geom make_geom(int64_t B, int64_t C, int64_t H, int64_t W, int64_t n, int stride) {
  Geom g;
  g.C = C;
  g.n = n;
  g.planes = B * C;
  g.H = H;
  g.W = W;
  g.Ho = H / stride;
  g.Wo = W / stride;
  g.stride = stride;
  g.vec = 0;
  return g;
}

// Which vector path the pointers and the geometry allow.
template <typename T> int pick_vec(const Geom& g, const void* x_like, const void* out_like1, const void* out_like2,
                                   const void* out_like3) {
  if (g.stride == 1) {
    const int N = Vec16<T>::N;
    return (g.H * g.W) % N == 0 && aligned_to(x_like, 16) && aligned_to(out_like1, 16) &&
           aligned_to(out_like2, 16) && aligned_to(out_like3, 16);
  }
  return g.W % 4 == 0 && aligned_to(x_like, 4 * sizeof(T)) && aligned_to(out_like1, 4 * sizeof(T)) &&
         aligned_to(out_like2, 2 * sizeof(T)) && aligned_to(out_like3, 2 * sizeof(T));
}

template <typename T>
int writeback_fwd_impl(const T* x, const T* a, const int64_t* idx, const T* y, const T* beta, int64_t B, int64_t C,
                       int64_t H, int64_t W, int64_t n, int stride, T* out, void* workspace, cudaStream_t stream) {
  if (!sizes_ok(B, C, H, W, n, stride)) return static_cast<int>(cudaErrorInvalidValue);
  Geom g = make_geom(B, C, H, W, n, stride);
  if (g.planes == 0 || g.Ho * g.Wo == 0) return 0;
  int* inv = static_cast<int*>(workspace);
  int err = launch_inverse_map<WritebackOp>(idx, n, C, inv, stream);
  if (err) return err;
  // stride 1: x, y, out 16-byte units; stride 2: x 4-wide rows (the out/y pairs need half that).
  g.vec = stride == 1 ? pick_vec<T>(g, x, y, out, out) : pick_vec<T>(g, x, x, y, out);
  const int64_t units = g.stride == 1 ? (g.vec ? g.Ho * g.Wo / Vec16<T>::N : g.Ho * g.Wo)
                                      : (g.vec ? g.Ho * g.Wo / 2 : g.Ho * g.Wo);
  const PlaneLaunch L = plane_launch(g.planes, units, /*tiled=*/true);
  if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
  writeback_fwd_kernel<T><<<L.grid, L.block, 0, stream>>>(x, a, inv, y, beta, g, L.warp_mode, L.tile, out);
  ADARTS_LAUNCH_CHECK();
  return 0;
}

template <typename T>
int writeback_bwd_impl(const T* grad, const T* x, const T* a, const int64_t* idx, const T* y, const T* beta,
                       int64_t B, int64_t C, int64_t H, int64_t W, int64_t n, int stride, T* dx, T* da, T* dy,
                       T* dbeta, void* workspace, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  if (!sizes_ok(B, C, H, W, n, stride)) return static_cast<int>(cudaErrorInvalidValue);
  Geom g = make_geom(B, C, H, W, n, stride);
  int* inv = static_cast<int*>(workspace);
  A* partial = beta != nullptr
                   ? reinterpret_cast<A*>(static_cast<char*>(workspace) + round_up(static_cast<size_t>(C) * sizeof(int)))
                   : nullptr;
  if (g.planes > 0) {
    int err = launch_inverse_map<WritebackOp>(idx, n, C, inv, stream);
    if (err) return err;
    // stride 1: grad, x, dx, y, dy all in 16-byte units (dy/y checked, grad/x/dx below);
    // stride 2: x, dx 4-wide rows; grad, y, dy pairs.
    if (stride == 1) {
      g.vec = pick_vec<T>(g, grad, x, dx, y) && aligned_to(dy, 16);
    } else {
      g.vec = pick_vec<T>(g, x, dx, grad, y) && aligned_to(dy, 2 * sizeof(T));
    }
    const int64_t units = g.stride == 1 ? (g.vec ? g.Ho * g.Wo / Vec16<T>::N : g.Ho * g.Wo)
                                        : (g.vec ? g.Ho * g.Wo / 2 : g.Ho * g.Wo);
    // units may be 0 (H or W < 2 at stride 2): the groups still zero dx and write da.
    const PlaneLaunch L = plane_launch(g.planes, units > 0 ? units : 1, /*tiled=*/false);
    if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
    writeback_bwd_kernel<T><<<L.grid, L.block, 0, stream>>>(grad, x, a, inv, y, beta, g, L.warp_mode, dx, da, dy,
                                                            partial);
    ADARTS_LAUNCH_CHECK();
  }
  if (beta != nullptr) {
    dbeta_kernel<T><<<1, 1024, 0, stream>>>(partial, g.planes, dbeta);
    ADARTS_LAUNCH_CHECK();
  }
  return 0;
}

}  // namespace

size_t attention_writeback_fwd_workspace_bytes(int64_t C) {
  return round_up(static_cast<size_t>(C > 0 ? C : 1) * sizeof(int));
}

size_t attention_writeback_bwd_workspace_bytes(DType dt, int64_t B, int64_t C) {
  return round_up(static_cast<size_t>(C > 0 ? C : 1) * sizeof(int)) +
         round_up(static_cast<size_t>(B * C > 0 ? B * C : 1) * acc_size(dt));
}

int attention_writeback_fwd(DType dt, const void* x, const void* a, const int64_t* idx, const void* y,
                            const void* beta, int64_t B, int64_t C, int64_t H, int64_t W, int64_t n, int stride,
                            void* out, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return writeback_fwd_impl<T>(static_cast<const T*>(x), static_cast<const T*>(a), idx, static_cast<const T*>(y),
                                 static_cast<const T*>(beta), B, C, H, W, n, stride, static_cast<T*>(out), workspace,
                                 stream);
  });
}

int attention_writeback_bwd(DType dt, const void* grad, const void* x, const void* a, const int64_t* idx,
                            const void* y, const void* beta, int64_t B, int64_t C, int64_t H, int64_t W, int64_t n,
                            int stride, void* dx, void* da, void* dy, void* dbeta, void* workspace,
                            cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return writeback_bwd_impl<T>(static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(a),
                                 idx, static_cast<const T*>(y), static_cast<const T*>(beta), B, C, H, W, n, stride,
                                 static_cast<T*>(dx), static_cast<T*>(da), static_cast<T*>(dy),
                                 static_cast<T*>(dbeta), workspace, stream);
  });
}

}  // namespace cuda
}  // namespace adarts
