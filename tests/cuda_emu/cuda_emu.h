// Host emulation of the subset of CUDA that csrc/cuda/*.cu use, so that the kernel sources
// compile UNCHANGED as host C++ (g++) and run on the CPU in the test suite
// (tests/test_cuda_emulated.py). Reached through the stand-ins tests/cuda_emu/include/
// {cuda_runtime,cuda_fp16,cuda_bf16}.h. The harness (emu_harness.py) rewrites, before compiling:
//   kernel<<<grid, block, smem, stream>>>(args)  ->  ::emu::Launch("kernel", file, line, grid, block, smem,
//                                                                 stream).run(kernel, args)
//   __shared__ T name[N];                        ->  auto& name = ::emu::shared_var<T[N], id>();
//   extern __shared__ T name[];                  ->  T* name = (T*)::emu::dynamic_smem();
//   reinterpret_cast<P*>(p)                      ->  ::emu::aligned_cast<P*>(p)   (alignment checked)
//   assert(e)                                    ->  ADARTS_EMU_ASSERT(e)          (a device assert)
//
// Execution (tests/cuda_emu/cuda_emu.cpp): a grid runs block by block; a block runs with one
// host thread per CUDA thread. By default one thread runs at a time (a baton handed on at
// every barrier, warp operation and exit: deterministic, so a missing barrier gives the same
// wrong result on every run); ADARTS_EMU_SCHED=free runs them concurrently (for
// ThreadSanitizer). Divergent barriers, warp operations whose mask does not match the lanes
// that arrive, reads from lanes that did not take part, misaligned vector accesses, device
// asserts, bad launch configurations and deadlocks fail the launch: cudaGetLastError()
// returns the error, emu_message() says what happened and names the kernel.
// Settings (environment, read at each launch): ADARTS_EMU_SCHED=serial|free|reverse|random[:SEED]
// with an optional "+delayed" (adversarial schedules, see cuda_emu.cpp: reverse and seeded random
// orders per barrier interval; delayed: shared-memory stores stay private to their thread until
// the next __syncthreads; the harness sets it per launch with emu_set_schedule),
// ADARTS_EMU_TIMEOUT (seconds without progress before a block counts as deadlocked, 30),
// ADARTS_EMU_SMEM_LIMIT (bytes of dynamic shared memory per block, 48 KiB).
#pragma once

#include <math.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------ runtime types
struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // the same declaration as csrc/cuda/kernels.h

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchTimeout = 702,
  cudaErrorAssert = 710,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __restrict__ is understood by g++; __shared__ is removed by the harness's rewrite.

// ------------------------------------------------------------------ built-in variables
// Set by the emulator in each host thread before it runs its CUDA thread.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

// Fails the running launch (in a kernel thread: unwinds that thread) with a CUDA error code
// and a message; the kernel's name is added by the emulator.
[[noreturn]] void fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
bool in_kernel();
int lane_id();

void syncthreads(const char* file, int line);
// One warp operation of the calling lane: every lane of `mask` must reach the same operation
// (same site, same mask). Writes the values of all lanes of the warp into vals (those of the
// participating lanes) and returns the mask of the participants.
unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* vals, const char* file, int line, const char* what);

void* shared_block(const void* key, size_t bytes, size_t align);
void* dynamic_smem();
void atomic_lock();
void atomic_unlock();

// ------------------------------------------------------------------ barriers and shuffles
template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp operations move up to 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// The value of lane src (as __shfl_*_sync: src outside the caller's width segment gives its own).
template <typename T>
inline T shfl_read(unsigned got, const uint64_t* vals, int lane, int src, const char* file, int line,
                   const char* what) {
  if (!((got >> src) & 1u))
    fail(cudaErrorLaunchFailure, "%s at %s:%d: lane %d reads lane %d, which is not in the mask 0x%08x", what, file,
         line, lane, src, got);
  return from_bits<T>(vals[src]);
}

template <typename T>
inline T shfl_xor(const char* file, int line, unsigned mask, T v, int lane_mask, int width = warpSize) {
  uint64_t vals[32];
  const unsigned got = warp_exchange(mask, to_bits(v), vals, file, line, "__shfl_xor_sync");
  const int lane = lane_id();
  int src = lane ^ lane_mask;
  if (src >= (lane / width + 1) * width) src = lane;
  return shfl_read<T>(got, vals, lane, src & 31, file, line, "__shfl_xor_sync");
}
template <typename T>
inline T shfl_down(const char* file, int line, unsigned mask, T v, unsigned delta, int width = warpSize) {
  uint64_t vals[32];
  const unsigned got = warp_exchange(mask, to_bits(v), vals, file, line, "__shfl_down_sync");
  const int lane = lane_id();
  int src = lane + static_cast<int>(delta);
  if (src >= (lane / width + 1) * width) src = lane;
  return shfl_read<T>(got, vals, lane, src & 31, file, line, "__shfl_down_sync");
}
template <typename T>
inline T shfl_up(const char* file, int line, unsigned mask, T v, unsigned delta, int width = warpSize) {
  uint64_t vals[32];
  const unsigned got = warp_exchange(mask, to_bits(v), vals, file, line, "__shfl_up_sync");
  const int lane = lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < (lane / width) * width) src = lane;
  return shfl_read<T>(got, vals, lane, src & 31, file, line, "__shfl_up_sync");
}
template <typename T>
inline T shfl_idx(const char* file, int line, unsigned mask, T v, int src_lane, int width = warpSize) {
  uint64_t vals[32];
  const unsigned got = warp_exchange(mask, to_bits(v), vals, file, line, "__shfl_sync");
  const int lane = lane_id();
  const int src = (lane / width) * width + (src_lane % width);
  return shfl_read<T>(got, vals, lane, src & 31, file, line, "__shfl_sync");
}
inline unsigned ballot(const char* file, int line, unsigned mask, int pred) {
  uint64_t vals[32];
  const unsigned got = warp_exchange(mask, pred ? 1 : 0, vals, file, line, "__ballot_sync");
  unsigned r = 0;
  for (int l = 0; l < 32; ++l)
    if (((got >> l) & 1u) && vals[l]) r |= 1u << l;
  return r;
}

// ------------------------------------------------------------------ shared memory
// One object per block and declaration site, never zeroed: filled with 0xFF bytes (NaN floats,
// -1 ints) at the start of each block, so that a read before the write shows.
template <typename T, int Site> inline T& shared_var() {
  static const char key = 0;
  return *static_cast<T*>(shared_block(&key, sizeof(T), alignof(T)));
}

// ------------------------------------------------------------------ checked vector casts
template <typename P, typename U> inline P aligned_cast(U* p) {
  using E = typename std::remove_cv<typename std::remove_pointer<P>::type>::type;
  if constexpr (!std::is_void<E>::value) {
    if (in_kernel() && reinterpret_cast<uintptr_t>(p) % alignof(E) != 0)
      fail(cudaErrorMisalignedAddress, "misaligned address %p: an access of %zu bytes needs %zu-byte alignment",
           static_cast<const void*>(p), sizeof(E), alignof(E));
  }
  return reinterpret_cast<P>(p);
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) {
  fail(cudaErrorAssert, "device assert failed at %s:%d: %s (block %u,%u,%u thread %u,%u,%u)", file, line, expr,
       blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}

// ------------------------------------------------------------------ launches
void launch_impl(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
                 const std::function<void()>& body);

struct Launch {
  const char* name;
  const char* file;
  int line;
  dim3 grid, block;
  size_t smem;
  Launch(const char* n, const char* f, int l, dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr)
      : name(n), file(f), line(l), grid(g), block(b), smem(s) {}
  // The arguments are converted to the kernel's parameter types once (as CUDA copies them
  // into the parameter space); every thread gets its own copies.
  template <typename... P, typename... A> void run(void (*kernel)(P...), A&&... a) const {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with a wrong number of arguments");
    const std::tuple<typename std::decay<P>::type...> args(std::forward<A>(a)...);
    launch_impl(name, file, line, grid, block, smem, [kernel, &args] { std::apply(kernel, args); });
  }
};

}  // namespace emu

#define ADARTS_EMU_ASSERT(e) ((e) ? (void)0 : ::emu::assert_fail(#e, __FILE__, __LINE__))
#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::emu::shfl_down(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::emu::shfl_up(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(...) ::emu::shfl_idx(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(...) ::emu::ballot(__FILE__, __LINE__, __VA_ARGS__)

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();

// ------------------------------------------------------------------ atomics
template <typename T> inline T emu_atomic_rmw(T* p, T v, int op) {
  ::emu::atomic_lock();
  const T old = *p;
  *p = op == 0 ? (v > old ? v : old) : op == 1 ? (v < old ? v : old) : static_cast<T>(old + v);
  ::emu::atomic_unlock();
  return old;
}
inline int atomicMax(int* p, int v) { return emu_atomic_rmw(p, v, 0); }
inline int atomicMin(int* p, int v) { return emu_atomic_rmw(p, v, 1); }
inline int atomicAdd(int* p, int v) { return emu_atomic_rmw(p, v, 2); }
inline float atomicAdd(float* p, float v) { return emu_atomic_rmw(p, v, 2); }
inline double atomicAdd(double* p, double v) { return emu_atomic_rmw(p, v, 2); }

// ------------------------------------------------------------------ device math
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }

// ------------------------------------------------------------------ half / bfloat16
// Storage types with the bit patterns of IEEE binary16 / bfloat16; conversions from float
// round to nearest even, bit-exactly (checked against torch over every 16-bit pattern).
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};

inline float emu_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t emu_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return emu_bits_to_float(sign | 0x7f800000u | (m << 13));
  return emu_bits_to_float(sign | ((e + 112) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = emu_float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};  // NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to infinity
  if (a < 0x38800000u) {  // below the smallest normal half: a multiple of 2^-24
    const uint32_t e = a >> 23;
    if (e < 102) return __half{sign};  // below 2^-25: zero
    const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // value / 2^-24 = mant / 2^shift, 14 <= shift <= 24
    uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return __half{static_cast<uint16_t>(sign | q)};
  }
  uint32_t h = (a >> 13) - (112u << 10);
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_to_float(static_cast<uint32_t>(b.x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = emu_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

inline __half __float2half(float f) { return __float2half_rn(f); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
