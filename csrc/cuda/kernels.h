// Launchers of the adarts CUDA kernels: plain C++ declarations (no torch, no CUDA headers),
// included both by the .cu files (nvcc) and by the torch bindings (csrc/cuda/binding.h).
//
// The exact semantics of every operation is the plain-PyTorch reference,
// adarts_kernels/ops/reference.py. Conventions of every launcher:
//
// - all tensors are contiguous, on the device of `stream`; floating tensors share one dtype
//   `dt` (x's); arithmetic is done in float for F16/BF16/F32 and in double for F64;
// - `idx` is int64 (n,), values distinct and in [0, C) (out-of-range entries are ignored and
//   trip a device-side assert in debug builds (ADARTS_DEBUG=1: no NDEBUG; release builds define
//   NDEBUG); they never cause an out-of-bounds access);
// - `workspace` points to at least the bytes that the matching *_workspace_bytes function
//   returns (256-byte aligned, e.g. from the caching allocator); its content on entry is
//   irrelevant;
// - nothing is synchronised: every kernel is enqueued on `stream`, no host<->device copy;
// - the return value is cudaGetLastError() after the last launch (0 == cudaSuccess); a
//   launcher returns at the first failing launch.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace adarts {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3 };

// ---------------------------------------------------------------------------- size limits
// Every size limit of the launchers, in one place. The bindings check them before launching
// (binding.h: "adarts <op>: <what> = <value> is too large for the CUDA kernels (limit ...)");
// a launcher given larger sizes returns cudaErrorInvalidValue / cudaErrorInvalidConfiguration.
// tests/test_cuda_compile.py reads these constants and checks their uses.
constexpr int64_t kMaxInt = 2147483647;               // INT_MAX
// H*W of one plane (in-plane indices are int).
constexpr int64_t kMaxPlane = kMaxInt;
// Channel counts C and n (int channel indices; the inverse index map is one int per channel).
constexpr int64_t kMaxChannels = kMaxInt;
// Planes B*C (mixed_sum: B*n): a block per plane in the grid's x extent (2^31 - 1 blocks), int
// plane counts in the reductions.
constexpr int64_t kMaxPlanes = kMaxInt;
// A grid's y extent: the tiled elementwise kernels enlarge their tiles to stay below it; the
// GEMMs of attention_score have one row of blocks per kGemmTile rows.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kGemmTile = 16;
// Rows of attention_score's GEMMs: 2*B (pooled rows), C, and the hidden size C/2.
constexpr int64_t kMaxGemmRows = kGemmTile * kMaxGridY;

// ---------------------------------------------------------------------------- 1. scoring
// x: (B, C, HW), w1: (Ch, C), w2: (C, Ch) -> a: (B, C) (dtype dt), idx: (n_select,) int64,
// idx = the n_select highest a.sum(0) (summed in the accumulation type) in descending order,
// equal scores ordered by the lower channel, NaN above everything.
size_t attention_score_fwd_workspace_bytes(DType dt, int64_t B, int64_t C, int64_t Ch);
int attention_score_fwd(DType dt, const void* x, const void* w1, const void* w2, int64_t B, int64_t C,
                        int64_t HW, int64_t Ch, int64_t n_select, void* a, int64_t* idx, void* workspace,
                        cudaStream_t stream);

// grad_a, a: (B, C); -> dx: (B, C, HW), dw1: (Ch, C), dw2: (C, Ch). Pools recomputed from x.
size_t attention_score_bwd_workspace_bytes(DType dt, int64_t B, int64_t C, int64_t Ch);
int attention_score_bwd(DType dt, const void* grad_a, const void* x, const void* w1, const void* w2,
                        const void* a, int64_t B, int64_t C, int64_t HW, int64_t Ch, void* dx, void* dw1,
                        void* dw2, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------- 2. gather
// out[b, j] = x[b, idx[j]] * a[b, idx[j]]: out (B, n, HW). No workspace.
int attention_gather_fwd(DType dt, const void* x, const void* a, const int64_t* idx, int64_t B, int64_t C,
                         int64_t HW, int64_t n, void* out, cudaStream_t stream);

// grad: (B, n, HW) -> dx: (B, C, HW), da: (B, C), both fully written (zero off idx).
size_t attention_gather_bwd_workspace_bytes(int64_t C);
int attention_gather_bwd(DType dt, const void* grad, const void* x, const void* a, const int64_t* idx,
                         int64_t B, int64_t C, int64_t HW, int64_t n, void* dx, void* da, void* workspace,
                         cudaStream_t stream);

// ---------------------------------------------------------------------------- 3. write-back
// x: (B, C, H, W), y: (B, n, Ho, Wo) with Ho = H / stride, Wo = W / stride (floor; stride 1
// or 2); beta: pointer to ONE element of dtype dt on the device, or nullptr for beta = 1.
// out: (B, C, Ho, Wo).
size_t attention_writeback_fwd_workspace_bytes(int64_t C);
int attention_writeback_fwd(DType dt, const void* x, const void* a, const int64_t* idx, const void* y,
                            const void* beta, int64_t B, int64_t C, int64_t H, int64_t W, int64_t n,
                            int stride, void* out, void* workspace, cudaStream_t stream);

// grad: (B, C, Ho, Wo) -> dx: (B, C, H, W), da: (B, C), dy: (B, n, Ho, Wo), all fully
// written; dbeta: ONE element of dtype dt, written only when beta != nullptr (may then be
// nullptr otherwise). Deterministic: the beta gradient is reduced from per-plane partials.
size_t attention_writeback_bwd_workspace_bytes(DType dt, int64_t B, int64_t C);
int attention_writeback_bwd(DType dt, const void* grad, const void* x, const void* a, const int64_t* idx,
                            const void* y, const void* beta, int64_t B, int64_t C, int64_t H, int64_t W,
                            int64_t n, int stride, void* dx, void* da, void* dy, void* dbeta, void* workspace,
                            cudaStream_t stream);

// ---------------------------------------------------------------------------- 4. mixed sum
// x: (B, n, H, W), H, W >= 1 (even at stride 2); z: a host array of P device pointers,
// 0 <= P <= kMixedSumMaxZ, each (B, n, Ho, Wo) with Ho = H / stride, Wo = W / stride;
// z_weights: (P,) (may be null for P = 0); pool_weights: (2,) (max pool, avg pool);
// identity_weight: 0-dim, or nullptr: the identity term identity_weight * x is present iff
// the pointer is non-null (stride 1 only). Statistics mean, var: (Q, n), Q = P + 2, in the
// accumulation type (float for F16/BF16/F32, double for F64). eps > 0.
constexpr int kMixedSumMaxZ = 5;

// training != 0: mean and var are written (batch statistics, biased variance); otherwise they
// are read (the running statistics). y: (B, n, Ho, Wo).
size_t mixed_sum_fwd_workspace_bytes(DType dt, int64_t B, int64_t n, int P);
int mixed_sum_fwd(DType dt, const void* const* z, int P, const void* x, const void* z_weights,
                  const void* pool_weights, const void* identity_weight, int64_t B, int64_t n, int64_t H, int64_t W,
                  int stride, double eps, int training, void* mean, void* var, void* y, void* workspace,
                  cudaStream_t stream);

// grad: (B, n, Ho, Wo); mean, var: the statistics the forward used (read only); dz: a host
// array of P device pointers (each like z), dx: like x, dz_weights: (P,), dpool_weights: (2,),
// didentity_weight: 0-dim (0 when identity_weight is nullptr), of dtype dt, all fully
// written. The max-pool gradient goes to the first maximum of each window.
size_t mixed_sum_bwd_workspace_bytes(DType dt, int64_t B, int64_t n, int64_t H, int64_t W, int stride, int P);
int mixed_sum_bwd(DType dt, const void* grad, const void* const* z, int P, const void* x, const void* z_weights,
                  const void* pool_weights, const void* identity_weight, const void* mean, const void* var,
                  int64_t B, int64_t n, int64_t H, int64_t W, int stride, double eps, int training,
                  void* const* dz, void* dx, void* dz_weights, void* dpool_weights, void* didentity_weight,
                  void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace adarts
