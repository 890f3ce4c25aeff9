// CUDA kernels of adarts_C::attention_gather_fwd / attention_gather_bwd.
//
// Specification: adarts_kernels/ops/reference.py (attention_gather_fwd/bwd):
//   forward   out[b, j] = x[b, idx[j]] * a[b, idx[j]]                      (B, n, HW)
//   backward  dx[b, c] = grad[b, j] * a[b, c],  da[b, c] = sum_hw grad[b, j] * x[b, c]
//             for c = idx[j]; dx = da = 0 on the other channels.
// Bandwidth-bound: 16-byte vector accesses when every plane is 16-byte aligned, one warp per
// small plane (8 planes per block) or one block per large plane; the forward also splits
// large planes over gridDim.y. The backward walks the planes of dx through the inverse map
// inv[c] = j (or -1) built on the device, so that each da[b, c] has a single owner
// (deterministic, no atomics). Accumulation in float (double for double).
#include "common.cuh"

#include <cassert>
#include <climits>
#include <cstdint>

namespace adarts {
namespace cuda {
namespace {

// (the element-type helpers, sums, plane mapping and launch helpers are in common.cuh)

// Names this operator in the device-side messages of the inverse map (common.cuh).
struct GatherOp {
  __device__ static const char* name() { return "attention_gather"; }
};

// ------------------------------------------------------------------ kernels
// out plane (b, j) = x plane (b, idx[j]) * a[b, idx[j]]
template <typename T>
__global__ void __launch_bounds__(kThreads)
gather_fwd_kernel(const T* __restrict__ x, const T* __restrict__ a, const int64_t* __restrict__ idx, int64_t C,
                  int64_t n, int64_t planes, int64_t HW, int warp_mode, int vec, int64_t tile, T* __restrict__ out) {
  using A = typename AccT<T>::type;
  Span s;
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  if (!plane_span(planes, units, warp_mode, tile, s)) return;
  const int64_t b = s.plane / n, j = s.plane - b * n;
  const int64_t c = idx[j];
  assert(c >= 0 && c < C && "adarts attention_gather: idx out of range");
  const bool valid = c >= 0 && c < C;
  const A scale = valid ? to_acc(a[b * C + c]) : A(0);
  const T* src = x + (b * C + (valid ? c : 0)) * HW;
  T* dst = out + s.plane * HW;
  if (vec) {
    constexpr int N = Vec16<T>::N;
    const Vec16<T>* sv = reinterpret_cast<const Vec16<T>*>(src);
    Vec16<T>* dv = reinterpret_cast<Vec16<T>*>(dst);
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const Vec16<T> w = sv[u];
      Vec16<T> r;
#pragma unroll
      for (int k = 0; k < N; ++k) r.v[k] = from_acc<T>(valid ? to_acc(w.v[k]) * scale : A(0));
      dv[u] = r;
    }
  } else {
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size)
      dst[u] = from_acc<T>(valid ? to_acc(src[u]) * scale : A(0));
  }
}

// dx plane (b, c), da[b, c]: one group per plane of dx (the whole plane: da has one owner).
template <typename T>
__global__ void __launch_bounds__(kThreads)
gather_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ a,
                  const int* __restrict__ inv, int64_t C, int64_t n, int64_t planes, int64_t HW, int warp_mode,
                  int vec, T* __restrict__ dx, T* __restrict__ da) {
  using A = typename AccT<T>::type;
  __shared__ A sh[32];
  Span s;
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  if (!plane_span(planes, units, warp_mode, units, s)) return;
  const int64_t b = s.plane / C, c = s.plane - b * C;
  const int j = inv[c];  // uniform over the group: the branches below are group-uniform
  T* d = dx + s.plane * HW;
  constexpr int N = Vec16<T>::N;
  if (j < 0) {
    const T zero = from_acc<T>(A(0));
    if (vec) {
      Vec16<T> z;
#pragma unroll
      for (int k = 0; k < N; ++k) z.v[k] = zero;
      Vec16<T>* dv = reinterpret_cast<Vec16<T>*>(d);
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) dv[u] = z;
    } else {
      for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) d[u] = zero;
    }
    if (s.rank == 0) da[s.plane] = zero;
    return;
  }
  const A av = to_acc(a[s.plane]);
  const T* g = grad + (b * n + j) * HW;
  const T* xp = x + s.plane * HW;
  A sum = A(0);
  if (vec) {
    const Vec16<T>* gv = reinterpret_cast<const Vec16<T>*>(g);
    const Vec16<T>* xv = reinterpret_cast<const Vec16<T>*>(xp);
    Vec16<T>* dv = reinterpret_cast<Vec16<T>*>(d);
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const Vec16<T> gw = gv[u], xw = xv[u];
      Vec16<T> r;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A ge = to_acc(gw.v[k]);
        r.v[k] = from_acc<T>(ge * av);
        sum += ge * to_acc(xw.v[k]);
      }
      dv[u] = r;
    }
  } else {
    for (int64_t u = s.begin + s.rank; u < s.end; u += s.size) {
      const A ge = to_acc(g[u]);
      d[u] = from_acc<T>(ge * av);
      sum += ge * to_acc(xp[u]);
    }
  }
  sum = warp_mode ? warp_sum(sum) : block_sum(sum, sh);
  if (s.rank == 0) da[s.plane] = from_acc<T>(sum);
}

inline bool sizes_ok(int64_t B, int64_t C, int64_t HW, int64_t n) {
  return B >= 0 && C >= 0 && HW >= 0 && n >= 0 && n <= C && C <= kMaxChannels && HW <= kMaxPlane &&
         B * C <= kMaxPlanes;
}

template <typename T>
int gather_fwd_impl(const T* x, const T* a, const int64_t* idx, int64_t B, int64_t C, int64_t HW, int64_t n, T* out,
                    cudaStream_t stream) {
  if (!sizes_ok(B, C, HW, n)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t planes = B * n;
  if (planes == 0 || HW == 0) return 0;
  const bool vec = HW % Vec16<T>::N == 0 && aligned_to(x, 16) && aligned_to(out, 16);
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  const PlaneLaunch L = plane_launch(planes, units, /*tiled=*/true);
  if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
  gather_fwd_kernel<T><<<L.grid, L.block, 0, stream>>>(x, a, idx, C, n, planes, HW, L.warp_mode, vec ? 1 : 0, L.tile,
                                                       out);
  ADARTS_LAUNCH_CHECK();
  return 0;
}

template <typename T>
int gather_bwd_impl(const T* grad, const T* x, const T* a, const int64_t* idx, int64_t B, int64_t C, int64_t HW,
                    int64_t n, T* dx, T* da, void* workspace, cudaStream_t stream) {
  if (!sizes_ok(B, C, HW, n)) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t planes = B * C;
  if (planes == 0) return 0;
  int* inv = static_cast<int*>(workspace);
  int err = launch_inverse_map<GatherOp>(idx, n, C, inv, stream);
  if (err) return err;
  const bool vec = HW % Vec16<T>::N == 0 && aligned_to(grad, 16) && aligned_to(x, 16) && aligned_to(dx, 16);
  const int64_t units = vec ? HW / Vec16<T>::N : HW;
  // HW == 0: still one group per plane, which only writes da = 0.
  PlaneLaunch L = plane_launch(planes, units > 0 ? units : 1, /*tiled=*/false);
  if (!L.ok) return static_cast<int>(cudaErrorInvalidConfiguration);
  gather_bwd_kernel<T><<<L.grid, L.block, 0, stream>>>(grad, x, a, inv, C, n, planes, HW, L.warp_mode, vec ? 1 : 0,
                                                       dx, da);
  ADARTS_LAUNCH_CHECK();
  return 0;
}

}  // namespace

int attention_gather_fwd(DType dt, const void* x, const void* a, const int64_t* idx, int64_t B, int64_t C,
                         int64_t HW, int64_t n, void* out, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gather_fwd_impl<T>(static_cast<const T*>(x), static_cast<const T*>(a), idx, B, C, HW, n,
                              static_cast<T*>(out), stream);
  });
}

size_t attention_gather_bwd_workspace_bytes(int64_t C) {
  return static_cast<size_t>(C > 0 ? C : 1) * sizeof(int);
}

int attention_gather_bwd(DType dt, const void* grad, const void* x, const void* a, const int64_t* idx, int64_t B,
                         int64_t C, int64_t HW, int64_t n, void* dx, void* da, void* workspace, cudaStream_t stream) {
  return dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return gather_bwd_impl<T>(static_cast<const T*>(grad), static_cast<const T*>(x), static_cast<const T*>(a), idx,
                              B, C, HW, n, static_cast<T*>(dx), static_cast<T*>(da), workspace, stream);
  });
}

}  // namespace cuda
}  // namespace adarts
