// Helpers shared by the adarts CUDA kernels (attention_{score,gather,writeback}_kernel.cu):
// element-type traits and conversions, 16-byte vectors, warp / block sums, the plane-to-group
// mapping and its launch configuration, the dtype dispatch and the launch-error check.
//
// Plain CUDA (no torch header). Included only by the .cu files, never compiled on its own.
// Everything lives in an unnamed namespace inside adarts::cuda, as it did in each .cu file:
// every translation unit keeps its own internal-linkage copy.
#pragma once

#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <climits>
#include <cstdio>
#include <cstddef>
#include <cstdint>

namespace adarts {
namespace cuda {
static_assert(kMaxInt == INT_MAX, "kernels.h: kMaxInt is INT_MAX");
static_assert(kMaxPlane <= INT_MAX && kMaxChannels <= INT_MAX && kMaxPlanes <= INT_MAX,
              "kernels.h: planes, channels and plane counts are int-indexed");
static_assert(kMaxGridY == 65535, "kernels.h: kMaxGridY is CUDA's limit of gridDim.y");
namespace {

// ------------------------------------------------------------------ element-type helpers
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> struct Cast;
template <> struct Cast<float> { __device__ static float from(float v) { return v; } };
template <> struct Cast<double> { __device__ static double from(double v) { return v; } };
template <> struct Cast<__half> { __device__ static __half from(float v) { return __float2half_rn(v); } };
template <> struct Cast<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return Cast<T>::from(v); }

// Size of the accumulation type of dt (double for F64, float otherwise).
inline size_t acc_size(DType dt) { return dt == DType::F64 ? sizeof(double) : sizeof(float); }

// 16-byte vector of T (one 128-bit memory transaction).
template <typename T> struct alignas(16) Vec16 {
  static constexpr int N = 16 / static_cast<int>(sizeof(T));
  T v[N];
};

inline bool aligned_to(const void* p, size_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------ reductions
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the total.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* sh) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  A t = lane < nw ? sh[lane] : A(0);
  t = warp_sum(t);
  __syncthreads();  // sh may be reused
  return t;
}

// ------------------------------------------------------------------ plane mapping
// A "group" (one warp, or the whole block) walks the units [begin, end) of one plane.
// warp mode: 8 planes per 256-thread block, one per warp, no block synchronisation.
// block mode: one plane per blockIdx.x, tile blockIdx.y of `tile` units.
struct Span {
  int64_t plane, begin, end;
  int rank, size;
};

__device__ __forceinline__ bool plane_span(int64_t planes, int64_t units, int warp_mode, int64_t tile, Span& s) {
  if (warp_mode) {
    s.plane = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    s.rank = threadIdx.x & 31;
    s.size = 32;
    s.begin = 0;
    s.end = units;
  } else {
    s.plane = blockIdx.x;
    s.rank = threadIdx.x;
    s.size = blockDim.x;
    s.begin = static_cast<int64_t>(blockIdx.y) * tile;
    s.end = s.begin + tile < units ? s.begin + tile : units;
  }
  return s.plane < planes;
}

struct PlaneLaunch {
  dim3 grid, block;
  int warp_mode;
  int64_t tile;
  bool ok;
};

constexpr int kThreads = 256;

// tiled: split large planes over gridDim.y (elementwise kernels only; reductions keep one
// group per plane so that each plane's sum has a single owner).
inline PlaneLaunch plane_launch(int64_t planes, int64_t units, bool tiled) {
  PlaneLaunch L;
  L.block = dim3(kThreads);
  L.ok = planes > 0 && units > 0;
  if (units <= 256) {
    L.warp_mode = 1;
    L.tile = units;
    const int64_t g = ceil_div(planes, kThreads / 32);
    L.ok = L.ok && g <= kMaxInt;
    L.grid = dim3(static_cast<unsigned>(g > 0 ? g : 1));
    return L;
  }
  L.warp_mode = 0;
  int64_t tile = units, tiles = 1;
  if (tiled) {
    tile = kThreads * 8;
    tiles = ceil_div(units, tile);
    if (tiles > kMaxGridY) { tile = ceil_div(units, kMaxGridY); tiles = ceil_div(units, tile); }
  }
  L.tile = tile;
  L.ok = L.ok && planes <= kMaxPlanes;
  L.grid = dim3(static_cast<unsigned>(planes), static_cast<unsigned>(tiles));
  return L;
}

// ------------------------------------------------------------------ workspace
constexpr size_t kAlign = 256;
inline size_t round_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

// ------------------------------------------------------------------ host side
// f(Tag<T>{}) for the element type T of dt; an unknown dt gives cudaErrorInvalidValue.
template <typename T> struct Tag { using type = T; };

template <typename F> inline int dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: return f(Tag<float>{});
    case DType::F16: return f(Tag<__half>{});
    case DType::BF16: return f(Tag<__nv_bfloat16>{});
    case DType::F64: return f(Tag<double>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// In a launcher returning int: return the pending launch error, if any.
#define ADARTS_LAUNCH_CHECK()                           \
  do {                                                  \
    const cudaError_t e_ = cudaGetLastError();          \
    if (e_ != cudaSuccess) return static_cast<int>(e_); \
  } while (0)

// ------------------------------------------------------------------ inverse index map
// inv[c] = j with idx[j] == c, else -1 (one block). A repeated channel keeps its largest j
// (atomicMax: deterministic even for invalid input); out-of-range entries are skipped.
// Op names the operator in the messages: a tag type with
//   __device__ static const char* name();   // e.g. "attention_gather"
// Builds without NDEBUG print "adarts <op>: idx[j] = c is out of range [0, C)" for an
// out-of-range entry and trip a device assert.
template <typename Op>
__global__ void inverse_map_kernel(const int64_t* __restrict__ idx, int n, int C, int* __restrict__ inv) {
  for (int c = threadIdx.x; c < C; c += blockDim.x) inv[c] = -1;
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t c = idx[j];
    const bool in_range = c >= 0 && c < C;
#ifndef NDEBUG
    if (!in_range) {
      printf("adarts %s: idx[%d] = %lld is out of range [0, %d)\n", Op::name(), j, static_cast<long long>(c), C);
    }
#endif
    assert(in_range && "adarts: idx out of range (inverse_map_kernel; the op is named in the message above)");
    if (in_range) atomicMax(inv + c, j);
  }
}

// Enqueues inverse_map_kernel<Op> (inv: C ints of workspace); returns the launch error, if any.
template <typename Op>
inline int launch_inverse_map(const int64_t* idx, int64_t n, int64_t C, int* inv, cudaStream_t stream) {
  if (C <= 0) return 0;
  const int64_t most = C > n ? C : n;
  const int threads = most >= 1024 ? 1024 : static_cast<int>(ceil_div(most, 32) * 32);
  inverse_map_kernel<Op><<<1, threads, 0, stream>>>(idx, static_cast<int>(n), static_cast<int>(C), inv);
  ADARTS_LAUNCH_CHECK();
  return 0;
}

}  // namespace
}  // namespace cuda
}  // namespace adarts
