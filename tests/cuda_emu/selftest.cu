// Kernels with one known defect each, for the emulator's own tests (tests/test_cuda_emulated.py):
// every defect must fail its launch with a message. Compiled through the same rewrite as
// csrc/cuda/*.cu. emu_selftest(which, buf) returns cudaGetLastError() after the launch;
// buf holds at least 1024 ints.
#include <cuda_runtime.h>

#include <cassert>
#include <chrono>

namespace {

__global__ void block_sum_kernel(int* out) {  // correct: shared memory, barriers, shuffles
  __shared__ int part[32];
  int v = static_cast<int>(threadIdx.x);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int t = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) t += part[w];
    out[blockIdx.x] = t;
  }
}

__global__ void write_kernel(int* out) { out[threadIdx.x] = 1; }

__global__ void two_barriers_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exit_before_shuffle_kernel(int* out) {
  if (threadIdx.x == 7) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void mask_mismatch_kernel(int* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, static_cast<int>(threadIdx.x), 1);
}

__global__ void read_outside_mask_kernel(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
  out[threadIdx.x] = v;
}

__global__ void partial_warp_kernel(int* out) {  // launched with 48 threads: warp 1 has 16 lanes
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void deadlock_kernel(int* out) {
  if ((threadIdx.x & 31) == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  }
}

__global__ void spin_kernel(int* out) {  // never reaches a synchronisation point for 0.8 s
  const auto t0 = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(800)) {
  }
  out[0] = 1;
}

__global__ void assert_kernel(int* out) {
  assert(out[threadIdx.x] == 12345 && "selftest: not 12345");
  out[threadIdx.x] = 1;
}

struct alignas(16) Vec4 {
  float v[4];
};
__global__ void misaligned_kernel(int* out) {
  const Vec4 w = *reinterpret_cast<const Vec4*>(reinterpret_cast<const float*>(out) + 1);
  out[0] = static_cast<int>(w.v[0]);
}

__global__ void dynamic_smem_kernel(int* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  int* s = reinterpret_cast<int*>(raw);
  s[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}

}  // namespace

extern "C" int emu_selftest(int which, int* buf) {
  switch (which) {
    case 0: block_sum_kernel<<<3, 256>>>(buf); break;
    case 1: two_barriers_kernel<<<1, 64>>>(buf); break;
    case 2: exit_before_barrier_kernel<<<1, 64>>>(buf); break;
    case 3: exit_before_shuffle_kernel<<<1, 32>>>(buf); break;
    case 4: mask_mismatch_kernel<<<1, 32>>>(buf); break;
    case 5: read_outside_mask_kernel<<<1, 32>>>(buf); break;
    case 6: partial_warp_kernel<<<1, 48>>>(buf); break;
    case 7: deadlock_kernel<<<1, 64>>>(buf); break;
    case 8: spin_kernel<<<1, 1>>>(buf); break;
    case 9: assert_kernel<<<1, 32>>>(buf); break;
    case 10: misaligned_kernel<<<1, 1>>>(buf); break;
    case 11: write_kernel<<<1, 1025>>>(buf); break;
    case 12: write_kernel<<<dim3(1, 65536), 1>>>(buf); break;
    case 13: write_kernel<<<dim3(1u << 31), 1>>>(buf); break;
    case 14: write_kernel<<<0, 32>>>(buf); break;
    case 15: dynamic_smem_kernel<<<1, 64, 64 * 1024>>>(buf); break;
    case 16: dynamic_smem_kernel<<<2, 64, 64 * sizeof(int)>>>(buf); break;
    case 17: write_kernel<<<dim3(1, 1, 2), dim3(8, 8, 65)>>>(buf); break;
    default: return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
