// CPU kernels of adarts_C::attention_gather_fwd / attention_gather_bwd.
//
// Specification: adarts_kernels/ops/reference.py (attention_gather_fwd/_bwd).
//   forward:  x_sel[b, j] = x[b, idx[j]] * a[b, idx[j]]                     (B, n, H, W)
//   backward: dx[b, idx[j]] = grad[b, j] * a[b, idx[j]],
//             da[b, idx[j]] = sum_hw grad[b, j] * x[b, idx[j]],  zero on the other channels.
// Products and sums in at::opmath_type<scalar_t>, outputs rounded to the input dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../validate.h"
#include "reduce.h"

namespace adarts {
namespace {

constexpr const char* kOp = "attention_gather";

void check_x_a(const at::Tensor& x, const at::Tensor& a) {
  validate_x(kOp, x, c10::DeviceType::CPU);
  validate_a(kOp, a, x, c10::DeviceType::CPU);
}

}  // namespace

at::Tensor attention_gather_fwd_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& idx) {
  check_x_a(x, a);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  check_index(kOp, idx, x);
  const int64_t n = idx.size(0);
  at::Tensor out = at::empty({B, n, H, W}, x.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_gather_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * n, plane_grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / n, c = ip[i % n];
        const acc_t s = static_cast<acc_t>(ap[b * C + c]);
        const scalar_t* src = xp + (b * C + c) * HW;
        scalar_t* dst = op + i * HW;
        for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<scalar_t>(static_cast<acc_t>(src[p]) * s);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_gather_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& a, const at::Tensor& idx) {
  check_x_a(x, a);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const std::vector<int64_t> sel = check_index(kOp, idx, x);
  const int64_t n = idx.size(0);
  validate_gather_grad(kOp, grad, x, n, c10::DeviceType::CPU);

  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor da = at::empty(a.sizes(), a.options());
  if (B * C == 0) return {dx, da};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adarts attention_gather_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dap = da.data_ptr<scalar_t>();
    // One work item per (b, c) plane of dx, so that every element of dx and da is written.
    at::parallel_for(0, B * C, plane_grain(HW), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / C, c = i % C, j = sel[c];
        scalar_t* dst = dxp + i * HW;
        if (j < 0) {
          std::fill(dst, dst + HW, static_cast<scalar_t>(0));
          dap[i] = static_cast<scalar_t>(0);
          continue;
        }
        const acc_t s = static_cast<acc_t>(ap[i]);
        const scalar_t* g = gp + (b * n + j) * HW;
        const scalar_t* xs = xp + i * HW;
        for (int64_t p = 0; p < HW; ++p) dst[p] = static_cast<scalar_t>(static_cast<acc_t>(g[p]) * s);
        const acc_t sum = blocked_sum<acc_t>(HW, [&](int64_t p) {
          return static_cast<acc_t>(g[p]) * static_cast<acc_t>(xs[p]);
        });
        dap[i] = static_cast<scalar_t>(sum);
      }
    });
  });
  return {dx, da};
}

TORCH_LIBRARY_IMPL(adarts_C, CPU, m) {
  m.impl("attention_gather_fwd", &attention_gather_fwd_cpu);
  m.impl("attention_gather_bwd", &attention_gather_bwd_cpu);
}

}  // namespace adarts
