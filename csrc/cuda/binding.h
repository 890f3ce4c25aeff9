// Helpers shared by the CUDA bindings of the adarts_C operators (csrc/cuda/<op>_binding.cpp):
// dtype mapping, launch checks, the current stream, workspaces and the common x check.
//
// Torch headers are fine here: only the host-compiled bindings include this header (inside
// their WITH_CUDA guard), never nvcc; the .cu files see kernels.h alone.
//
// Nothing here synchronises with the device: workspaces come from the caching allocator
// (at::empty), every kernel is enqueued on the current stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../validate.h"
#include "kernels.h"

namespace adarts {

constexpr c10::DeviceType kCUDA = c10::DeviceType::CUDA;

// The launchers' dtype tag of t (x's dtype; the bindings' checks make every operand match it).
inline cuda::DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    case at::kDouble: return cuda::DType::F64;
    default: break;
  }
  ADARTS_CHECK(false, op, "x must be a floating tensor (float16, bfloat16, float32 or float64), got ",
               t.scalar_type());
  return cuda::DType::F32;  // unreachable
}

// err: a launcher's return value (cudaGetLastError() after its last launch).
inline void check_launch(const char* op, const char* kernel, int err) {
  ADARTS_CHECK(err == 0, op, "CUDA launch of ", kernel, " failed: ",
               cudaGetErrorString(static_cast<cudaError_t>(err)), " (error ", err, ")");
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A byte buffer of at least one byte on like's device, from the caching allocator.
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

// value <= limit (a size limit of the CUDA launchers, kernels.h), else
// "adarts <op>: <what> = <value> is too large for the CUDA kernels (limit <limit>), got x of sizes ...".
inline void check_limit(const char* op, const char* what, int64_t value, int64_t limit, const at::Tensor& x) {
  ADARTS_CHECK(value <= limit, op, what, " = ", value, " is too large for the CUDA kernels (limit ", limit,
               "), got x of sizes ", x.sizes());
}

// The limits every launcher shares, for x (B, C, H, W) (mixed_sum: (B, n, H, W)): the plane
// size H*W, the channel count C and the plane count B*C.
inline void check_plane_limits(const char* op, const at::Tensor& x) {
  check_limit(op, "the plane size H*W", x.size(2) * x.size(3), cuda::kMaxPlane, x);
  check_limit(op, "the channel count", x.size(1), cuda::kMaxChannels, x);
  check_limit(op, "the plane count B*C", x.size(0) * x.size(1), cuda::kMaxPlanes, x);
}

// x: CUDA, 4-d, floating, contiguous, within the size limits of the CUDA kernels.
inline void check_x(const char* op, const at::Tensor& x) {
  validate_x(op, x, kCUDA);
  check_plane_limits(op, x);
}

// x as check_x, a: CUDA, like x, of shape (B, C) (the gather and the write-back).
inline void check_x_a(const char* op, const at::Tensor& x, const at::Tensor& a) {
  check_x(op, x);
  validate_a(op, a, x, kCUDA);
}

}  // namespace adarts
