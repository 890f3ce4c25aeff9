// adarts_C::edge: the fused ADARTS edge as one autograd node in C++ (its forward and backward
// call adarts_C::edge_fwd / edge_bwd, csrc/edge.cpp).
//
// The Python autograd.Function of adarts_kernels/nn/fused_function.py (FusedEdgeFunction) does
// the same with the same two operators; this node takes the interpreter out of the step: the
// saving, unpacking and re-packing of the edge's state and the autograd trampoline, per edge
// and per direction. It covers the common case the module routes here (see
// FusedAttentionMixedOp.forward): the built-in top-k selection, every BatchNorm of the edge
// normalising with batch statistics, the running statistics moved in the forward. With
// recompute, only the inputs and the selected indices are kept and backward re-runs the
// forward (no statistics move a second time). The results are bitwise those of the Python node
// (tested, under autocast too: the re-run needs no autocast state of its own, as every operand
// of the edge is cast to the input's dtype explicitly).
//
// Backward is first-order: with create_graph its gradients carry an error node, and
// differentiating them raises (as torch.autograd.function.once_differentiable does).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace adarts {
namespace {

using at::Tensor;
using TL = std::vector<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

TL call_edge_fwd(const Tensor& x, const std::optional<Tensor>& idx, int64_t n_select, at::TensorList params,
                 const Tensor& weights, const std::optional<Tensor>& ew, at::IntArrayRef specs, at::IntArrayRef seps,
                 at::IntArrayRef cols, int64_t stride, double eps, at::ArrayRef<double> sep_eps, bool keep, bool replay,
                 bool channels_last, at::TensorList running, double momentum, bool merge) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::edge_fwd", "")
                       .typed<TL(const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, int64_t,
                                 at::TensorList, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef,
                                 at::IntArrayRef, at::IntArrayRef, int64_t, double, at::ArrayRef<double>, bool, bool,
                                 bool, at::TensorList, double, bool)>();
  return op.call(x, c10::nullopt, idx, n_select, params, weights, ew, specs, seps, cols, stride, eps, sep_eps, keep,
                 replay, channels_last, running, momentum, merge);
}

TL call_edge_bwd(const Tensor& grad, const Tensor& x, const Tensor& a, const Tensor& idx, const Tensor& xs,
                 const Tensor& y, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& ew,
                 const Tensor& weights, at::TensorList params, at::TensorList zs, at::TensorList sep_state,
                 at::TensorList kept, at::IntArrayRef specs, at::IntArrayRef seps, at::IntArrayRef cols,
                 int64_t stride, double eps, bool channels_last, bool flip, bool merge) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("adarts_C::edge_bwd", "")
          .typed<TL(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, at::TensorList,
                    at::TensorList, at::TensorList, at::TensorList, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                    int64_t, double, bool, bool, bool)>();
  return op.call(grad, x, a, idx, xs, y, mean, var, ew, weights, params, zs, sep_state, kept, specs, seps, cols, stride,
                 eps, channels_last, flip, merge);
}

Tensor as(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

// recompute.selected_only: a view into the top-k's full sort is cloned, so that only the
// selected indices are kept
Tensor selected_only(const Tensor& idx) {
  return idx.storage().nbytes() != idx.nbytes() ? idx.clone() : idx;
}

struct EdgeNode : public torch::autograd::Function<EdgeNode> {
  // Returns (out, idx); idx is not differentiable.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weights,
                               const std::optional<Tensor>& ew, at::TensorList params, at::TensorList running,
                               int64_t n_select, at::IntArrayRef specs, at::IntArrayRef seps, at::IntArrayRef cols,
                               int64_t stride, double eps, at::ArrayRef<double> sep_eps, double momentum,
                               bool channels_last, bool flip, bool merge, bool recompute) {
    const at::ScalarType dt = x.scalar_type();
    TL res = call_edge_fwd(x, c10::nullopt, n_select, params, as(weights, dt), ew, specs, seps, cols, stride, eps,
                           sep_eps, false, false, channels_last, running, momentum, merge);
    const Tensor out = res[0], a = res[res.size() - 2], idx = res[res.size() - 1];
    auto& d = ctx->saved_data;
    d["n"] = n_select;
    d["specs"] = specs.vec();
    d["seps"] = seps.vec();
    d["cols"] = cols.vec();
    d["stride"] = stride;
    d["eps"] = eps;
    d["sep_eps"] = sep_eps.vec();
    d["cl"] = channels_last;
    d["flip"] = flip;
    d["merge"] = merge;
    d["recompute"] = recompute;
    d["n_params"] = static_cast<int64_t>(params.size());
    d["n_running"] = static_cast<int64_t>(running.size());
    TL saved{x, weights, ew.has_value() ? *ew : Tensor()};
    if (recompute) {
      saved.push_back(selected_only(idx));
      saved.insert(saved.end(), params.begin(), params.end());
    } else {
      // as FusedEdgeFunction saves: a, idx, xs, y, mean, var, the params, the z's, per sep_conv (u, mean, rstd)
      const int64_t P = static_cast<int64_t>(specs.size()) / 4, S = static_cast<int64_t>(seps.size()) / 4;
      saved.insert(saved.end(), {a, idx, res[1], res[2], res[3], res[4]});
      saved.insert(saved.end(), params.begin(), params.end());
      saved.insert(saved.end(), res.begin() + 5, res.begin() + 5 + P);
      for (int64_t i = 0; i < S; ++i) {
        const size_t at = 5 + P + 4 * i;
        saved.insert(saved.end(), {res[at], res[at + 1], res[at + 3]});   // u, mean1, rstd1 (not var1)
      }
    }
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({idx});
    return {out, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor grad = grads[0];
    auto& d = ctx->saved_data;
    const TL saved = ctx->get_saved_variables();
    const std::vector<int64_t> specs = d["specs"].toIntVector(), seps = d["seps"].toIntVector(),
                               cols = d["cols"].toIntVector();
    const std::vector<double> sep_eps = d["sep_eps"].toDoubleVector();
    const int64_t n = d["n"].toInt(), stride = d["stride"].toInt(), n_params = d["n_params"].toInt();
    const double eps = d["eps"].toDouble();
    const bool cl = d["cl"].toBool(), flip = d["flip"].toBool(), merge = d["merge"].toBool();
    const bool create_graph = at::GradMode::is_enabled();
    const Tensor &x = saved[0], &weights = saved[1];
    const std::optional<Tensor> ew = saved[2].defined() ? std::optional<Tensor>(saved[2]) : c10::nullopt;
    const at::ScalarType dt = x.scalar_type();
    const Tensor w = as(weights, dt);
    TL g;
    {
      const at::NoGradGuard no_grad;
      if (d["recompute"].toBool()) {
        const Tensor& idx = saved[3];
        const TL params(saved.begin() + 4, saved.begin() + 4 + n_params);
        // the re-run (keep: its intermediates for the backward that follows at once), laid out as
        // edge_fwd returns it with keep: [_, xs, y, mean, var, z's, per sep (u, m1, v1, rstd1, h, t), r, t's, a, idx]
        const TL res = call_edge_fwd(x, idx, n, params, w, ew, specs, seps, cols, stride, eps, sep_eps, true, true,
                                     cl, {}, 0.0, merge);
        const int64_t P = static_cast<int64_t>(specs.size()) / 4, S = static_cast<int64_t>(seps.size()) / 4;
        TL sep_state;
        for (int64_t i = 0; i < S; ++i) {
          const size_t at = 5 + P + 6 * i;
          sep_state.insert(sep_state.end(), {res[at], res[at + 1], res[at + 3], res[at + 4], res[at + 5]});
        }
        const size_t at_kept = 5 + P + 6 * S;
        const TL zs(res.begin() + 5, res.begin() + 5 + P);
        const TL kept(res.begin() + at_kept, res.begin() + at_kept + 1 + P);
        g = call_edge_bwd(grad, x, res[res.size() - 2], idx, res[1], res[2], res[3], res[4], ew, w, params, zs,
                          sep_state, kept, specs, seps, cols, stride, eps, cl, flip, merge);
      } else {
        const Tensor &a = saved[3], &idx = saved[4], &xs = saved[5], &y = saved[6], &mean = saved[7],
                     &var = saved[8];
        const TL params(saved.begin() + 9, saved.begin() + 9 + n_params);
        const int64_t P = static_cast<int64_t>(specs.size()) / 4;
        const size_t at_z = 9 + n_params;
        const TL zs(saved.begin() + at_z, saved.begin() + at_z + P);
        const TL sep_state(saved.begin() + at_z + P, saved.end());
        g = call_edge_bwd(grad, x, a, idx, xs, y, mean, var, ew, w, params, zs, sep_state, {}, specs, seps, cols,
                          stride, eps, cl, flip, merge);
      }
    }
    // one gradient per forward argument: x, weights, ew, each param; none for each running buffer and
    // the 12 non-tensor arguments
    variable_list out{g[0], as(g[1], weights.scalar_type()), ew.has_value() ? g[2] : Tensor()};
    out.insert(out.end(), g.begin() + 3, g.end());
    out.resize(out.size() + static_cast<size_t>(d["n_running"].toInt()) + 12);
    if (create_graph) {   // first-order only: differentiating these gradients raises
      for (auto& t : out) {
        if (t.defined()) {
          t = t.detach();
          t.set_requires_grad(true);
        }
      }
      auto err = std::make_shared<torch::autograd::DelayedError>(
          "adarts edge: trying to differentiate twice (the fused edge's backward is first-order only)",
          static_cast<int64_t>(out.size()));
      out = err->apply(std::move(out));
    }
    return out;
  }
};

std::tuple<Tensor, Tensor> edge(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& ew,
                                at::TensorList params, at::TensorList running, int64_t n_select, at::IntArrayRef specs,
                                at::IntArrayRef seps, at::IntArrayRef cols, int64_t stride, double eps,
                                at::ArrayRef<double> sep_eps, double momentum, bool channels_last, bool flip,
                                bool merge, bool recompute) {
  auto res = EdgeNode::apply(x, weights, ew, params, running, n_select, specs, seps, cols, stride, eps, sep_eps,
                             momentum, channels_last, flip, merge, recompute);
  return {res[0], res[1]};
}

// Below autograd (no graph to build): the forward alone.
std::tuple<Tensor, Tensor> edge_no_graph(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& ew,
                                         at::TensorList params, at::TensorList running, int64_t n_select,
                                         at::IntArrayRef specs, at::IntArrayRef seps, at::IntArrayRef cols,
                                         int64_t stride, double eps, at::ArrayRef<double> sep_eps, double momentum,
                                         bool channels_last, bool flip, bool merge, bool /*recompute*/) {
  TL res = call_edge_fwd(x, c10::nullopt, n_select, params, as(weights, x.scalar_type()), ew, specs, seps, cols, stride,
                         eps, sep_eps, false, false, channels_last, running, momentum, merge);
  return {res[0], res[res.size() - 1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adarts_C, m) {
  m.def("edge(Tensor x, Tensor weights, Tensor? ew, Tensor[] params, Tensor[] running, int n_select, int[] specs, "
        "int[] seps, int[] cols, int stride, float eps, float[] sep_eps, float momentum, bool channels_last, "
        "bool flip, bool merge, bool recompute) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adarts_C, Autograd, m) { m.impl("edge", TORCH_FN(edge)); }

TORCH_LIBRARY_IMPL(adarts_C, CompositeExplicitAutograd, m) { m.impl("edge", TORCH_FN(edge_no_graph)); }

}  // namespace adarts
