// adarts_C::edge_fwd / edge_bwd: the fused ADARTS edge after the channel selection, in one
// call per direction (the host-side sequence of adarts_kernels/nn/fused_function.py, in C++).
//
// A search step at CIFAR batch sizes spends microseconds per GPU kernel, so what an edge costs
// is set by the host. The one-node eager path of FusedAttentionMixedOp runs about a hundred
// small operations per edge forward + backward; issued from Python each costs the
// interpreter's time on top of the dispatcher's. These two operators issue the same ATen and
// adarts_C calls, in the same order and with the same arguments, from C++: the results are
// bitwise those of the Python sequence (tested in tests/test_fused_function.py), on whatever
// device the tensors live (ATen dispatches; the adarts_C kernels are reached through the
// dispatcher, so CPU tensors run csrc/cpu and CUDA tensors the CUDA kernels).
//
// Device-dependent choices are made by the caller and passed in (channels_last: the
// convolutions' operand layout; flip: the stride-1 depthwise input gradient as a flipped
// forward convolution), so that every line here runs in the CPU tests.
//
// Scope: batch statistics (every BatchNorm of the edge in training mode), indices that need
// no validation; the caller runs the Python sequence otherwise. The running statistics are
// moved by the caller from the returned batch statistics.
//
// Encodings (ints):
//   specs: 4 per chain after the shared ReLU: kind (0 conv, 1 FactorizedReduce, 2 depthwise
//          then pointwise), stride, padding, dilation;
//   seps:  4 per sep_conv second half: chain index, stride, padding, dilation;
//   cols:  P, the P z columns, the two pool columns, the identity column (-1: none).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace adarts {
namespace {

using at::Tensor;
using TL = std::vector<Tensor>;

enum Kind : int64_t { kConv = 0, kFr = 1, kDwPw = 2 };

// adarts_kernels/nn/units.py: FLIP_MIN_VALUES (the flipped input gradient pays from this many
// values per channel up; tests/test_fused_function.py checks the two agree)
constexpr int64_t kFlipMinValues = 2048;

at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

Tensor as(const Tensor& t, at::ScalarType dt) { return t.scalar_type() == dt ? t : t.to(dt); }

Tensor layout(const Tensor& t, bool channels_last) {
  if (channels_last && t.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
  return t.contiguous();
}

Tensor channel(const Tensor& v) { return v.view({1, -1, 1, 1}); }

// the parameter gradient g in w's dtype and strides (units.grad_like)
Tensor grad_like(const Tensor& g0, const Tensor& w) {
  Tensor g = as(g0, w.scalar_type());
  if (g.strides() == w.strides()) return g;
  if (g.is_contiguous() && w.is_contiguous()) return g.as_strided(w.sizes(), w.strides());
  return at::empty_like(w).copy_(g);
}

Tensor even(const Tensor& r) { return r.slice(2, 0, c10::nullopt, 2).slice(3, 0, c10::nullopt, 2); }
Tensor odd(const Tensor& r) { return r.slice(2, 1, c10::nullopt, 2).slice(3, 1, c10::nullopt, 2); }
Tensor mat(const Tensor& w) { return w.select(2, 0).select(2, 0); }   // w[:, :, 0, 0]

// (z, t): a chain's output and its depthwise output (undefined for other chains)
std::pair<Tensor, Tensor> chain_fwd(const Tensor& r, const int64_t* sp, const Tensor& w0, const Tensor& w1) {
  const int64_t kind = sp[0], s = sp[1], p = sp[2], d = sp[3];
  if (kind == kConv) return {at::conv2d(r, w0, {}, {s, s}, {p, p}), Tensor()};
  if (kind == kFr) {
    return {at::cat({at::einsum("oc,bchw->bohw", {mat(w0), even(r)}), at::einsum("oc,bchw->bohw", {mat(w1), odd(r)})},
                    1),
            Tensor()};
  }
  Tensor t = at::conv2d(r, w0, {}, {s, s}, {p, p}, {d, d}, r.size(1));
  return {at::conv2d(t, w1), t};
}

// (dr, dw0, dw1); t recomputed unless given
std::tuple<Tensor, Tensor, Tensor> chain_bwd(const Tensor& gz, const Tensor& r, const int64_t* sp, const Tensor& w0,
                                             const Tensor& w1, Tensor t, bool flip) {
  const int64_t kind = sp[0], s = sp[1], p = sp[2], d = sp[3];
  if (kind == kConv) {
    auto res = at::convolution_backward(gz, r, w0, c10::nullopt, {s, s}, {p, p}, {1, 1}, false, {0, 0}, 1,
                                        {true, true, false});
    return {std::get<0>(res), std::get<1>(res), Tensor()};
  }
  if (kind == kFr) {
    const int64_t half = w0.size(0);
    Tensor g0 = gz.slice(1, 0, half), g1 = gz.slice(1, half);
    Tensor r0 = even(r), r1 = odd(r);
    Tensor dw0 = at::einsum("bohw,bchw->oc", {g0, r0}).unsqueeze(2).unsqueeze(3);
    Tensor dw1 = at::einsum("bohw,bchw->oc", {g1, r1}).unsqueeze(2).unsqueeze(3);
    Tensor dr = at::zeros_like(r);
    even(dr).copy_(at::einsum("bohw,oc->bchw", {g0, mat(w0)}));
    odd(dr).copy_(at::einsum("bohw,oc->bchw", {g1, mat(w1)}));
    return {dr, dw0, dw1};
  }
  const int64_t n = r.size(1);
  if (!t.defined()) t = at::conv2d(r, w0, {}, {s, s}, {p, p}, {d, d}, n);
  auto pw = at::convolution_backward(gz, t, w1, c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                     {true, true, false});
  t.reset();
  Tensor dt = std::get<0>(pw), dw1 = std::get<1>(pw);
  const int64_t k = w0.size(-1);
  Tensor dr, dw0;
  if (s == 1 && 2 * p == d * (k - 1) && flip && r.numel() >= kFlipMinValues * n) {
    dr = at::conv2d(dt, w0.flip({2, 3}), {}, {1, 1}, {p, p}, {d, d}, n);
    dw0 = std::get<1>(at::convolution_backward(dt, r, w0, c10::nullopt, {1, 1}, {p, p}, {d, d}, false, {0, 0}, n,
                                               {false, true, false}));
  } else {
    auto dw = at::convolution_backward(dt, r, w0, c10::nullopt, {s, s}, {p, p}, {d, d}, false, {0, 0}, n,
                                       {true, true, false});
    dr = std::get<0>(dw);
    dw0 = std::get<1>(dw);
  }
  return {dr, dw0, dw1};
}

int64_t n_weights(const int64_t* sp) { return sp[0] == kConv ? 1 : 2; }

using GroupKey = std::tuple<int64_t, int64_t, int64_t>;   // stride, dilation, pointwise output width

// units.merge_groups: entries with a key (the mergeable ones) group by key, in the order of their
// first entry; every entry without one is alone
std::vector<std::vector<int64_t>> group_by_key(const std::vector<std::optional<GroupKey>>& keys) {
  std::vector<std::vector<int64_t>> groups;
  std::vector<std::pair<GroupKey, size_t>> where;
  for (int64_t i = 0; i < static_cast<int64_t>(keys.size()); ++i) {
    if (keys[i].has_value()) {
      auto it = std::find_if(where.begin(), where.end(), [&](const auto& e) { return e.first == *keys[i]; });
      if (it != where.end()) {
        groups[it->second].push_back(i);
        continue;
      }
      where.push_back({*keys[i], groups.size()});
    }
    groups.push_back({i});
  }
  return groups;
}

// a depthwise-then-pointwise chain (stride s, padding p, dilation d; weights wd, wp) may share a
// call when its kernel is square, odd and centred: then its key, else none
std::optional<GroupKey> merge_key(int64_t s, int64_t p, int64_t d, const Tensor& wd, const Tensor& wp) {
  const int64_t k = wd.size(-1);
  if (k == wd.size(-2) && k % 2 == 1 && 2 * p == d * (k - 1)) return GroupKey{s, d, wp.size(0)};
  return c10::nullopt;
}

// units._groups: the chains that share their convolution calls (merge: the caller's
// units._merge_pays). ws: the chains' weights, from offset 2 (after the attention's two).
std::vector<std::vector<int64_t>> chain_groups(at::IntArrayRef specs, const TL& ws, bool merge) {
  const int64_t n_chains = static_cast<int64_t>(specs.size()) / 4;
  std::vector<std::optional<GroupKey>> keys(n_chains);
  int64_t at_w = 2;
  for (int64_t i = 0; i < n_chains; ++i) {
    const int64_t* sp = specs.data() + 4 * i;
    if (merge && sp[0] == kDwPw) keys[i] = merge_key(sp[1], sp[2], sp[3], ws[at_w], ws[at_w + 1]);
    at_w += n_weights(sp);
  }
  return group_by_key(keys);
}

// units._sep_groups: the sep_convs' second halves by the same rule (merge and one input shape).
// seps: 4 ints per half (chain, stride, padding, dilation).
std::vector<std::vector<int64_t>> sep_groups(at::IntArrayRef seps, const TL& us, const TL& wds, const TL& wps,
                                             bool merge) {
  const int64_t n_seps = static_cast<int64_t>(seps.size()) / 4;
  bool same = true;
  for (const auto& u : us) same = same && u.sizes() == us[0].sizes();
  std::vector<std::optional<GroupKey>> keys(n_seps);
  for (int64_t i = 0; i < n_seps && merge && same; ++i) {
    const int64_t* sp = seps.data() + 4 * i;
    keys[i] = merge_key(sp[1], sp[2], sp[3], wds[i], wps[i]);
  }
  return group_by_key(keys);
}

// units._packed_kernel: depthwise kernels (n, 1, k_j, k_j) zero-padded to the largest, K, as one
// (n * m, 1, K, K): chain_major, chain j's for channels j*n:(j+1)*n (inputs side by side), else
// channel g * m + j (one input, channel multiplier m)
std::pair<Tensor, int64_t> packed_kernel(const TL& w0s, bool chain_major) {
  const int64_t m = static_cast<int64_t>(w0s.size()), n = w0s[0].size(0);
  int64_t K = 0;
  for (const auto& w : w0s) K = std::max(K, w.size(-1));
  Tensor wk = chain_major ? w0s[0].new_zeros({m, n, K, K}) : w0s[0].new_zeros({n, m, K, K});
  for (int64_t j = 0; j < m; ++j) {
    const int64_t k = w0s[j].size(-1), o = (K - k) / 2;
    wk.select(chain_major ? 0 : 1, j).slice(1, o, o + k).slice(2, o, o + k).copy_(w0s[j].select(1, 0));
  }
  return {wk.reshape({m * n, 1, K, K}), K};
}

// units._part: chain j's channels of a merged group's depthwise output (or its gradient): j::m
// (one shared input, channel multiplier m) or the j-th of m blocks (inputs side by side)
Tensor part(const Tensor& t, int64_t j, int64_t m, bool side_by_side) {
  if (side_by_side) {
    const int64_t n = t.size(1) / m;
    return t.slice(1, j * n, (j + 1) * n);
  }
  return t.slice(1, j, c10::nullopt, m);
}

// units._group_fwd: (zs, t), t the merged depthwise output (groups: the input's channels)
std::pair<TL, Tensor> group_fwd(const Tensor& r, int64_t s, int64_t d, const TL& w0s, const TL& w1s,
                                bool channels_last, bool side_by_side) {
  const int64_t m = static_cast<int64_t>(w0s.size());
  auto [wd, K] = packed_kernel(w0s, side_by_side);
  const int64_t P = d * (K - 1) / 2;
  Tensor t = at::conv2d(r, wd, {}, {s, s}, {P, P}, {d, d}, r.size(1));
  TL zs;
  for (int64_t j = 0; j < m; ++j) zs.push_back(at::conv2d(layout(part(t, j, m, side_by_side), channels_last), w1s[j]));
  return {zs, t};
}

// units._group_bwd: (dr, dw0s, dw1s), every chain with a gradient (the mixed sum gives each one);
// t recomputed unless given
std::tuple<Tensor, TL, TL> group_bwd(const TL& gzs, const Tensor& r, int64_t s, int64_t d, const TL& w0s,
                                     const TL& w1s, Tensor t, bool channels_last, bool side_by_side) {
  const int64_t m = static_cast<int64_t>(w0s.size()), n = r.size(1);
  auto [wd, K] = packed_kernel(w0s, side_by_side);
  const int64_t P = d * (K - 1) / 2;
  if (!t.defined()) t = at::conv2d(r, wd, {}, {s, s}, {P, P}, {d, d}, n);
  Tensor dt = at::empty_like(t);
  TL dw1s;
  for (int64_t j = 0; j < m; ++j) {
    auto pw = at::convolution_backward(gzs[j], layout(part(t, j, m, side_by_side), channels_last), w1s[j],
                                       c10::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1, {true, true, false});
    part(dt, j, m, side_by_side).copy_(std::get<0>(pw));
    dw1s.push_back(std::get<1>(pw));
  }
  t.reset();
  auto dw = at::convolution_backward(dt, r, wd, c10::nullopt, {s, s}, {P, P}, {d, d}, false, {0, 0}, n,
                                     {true, true, false});
  // chain j's kernel gradient at [j] of (m, n, K, K)
  Tensor dwd = side_by_side ? std::get<1>(dw).reshape({m, n / m, K, K})
                            : std::get<1>(dw).reshape({n, m, K, K}).transpose(0, 1);
  TL dw0s;
  for (int64_t j = 0; j < m; ++j) {
    const int64_t k = w0s[j].size(-1), o = (K - k) / 2;
    dw0s.push_back(dwd.select(0, j).slice(1, o, o + k).slice(2, o, o + k).unsqueeze(1));
  }
  return {std::get<0>(dw), dw0s, dw1s};
}

Tensor columns(const Tensor& w, const std::vector<int64_t>& cols) {
  bool consecutive = true;
  for (size_t i = 1; i < cols.size(); ++i) consecutive = consecutive && cols[i] == cols[i - 1] + 1;
  if (consecutive) return w.slice(0, cols[0], cols[0] + static_cast<int64_t>(cols.size()));
  TL parts;
  for (int64_t c : cols) parts.push_back(w.select(0, c));
  return at::stack(parts);
}

void put(Tensor& dst, const std::vector<int64_t>& cols, const Tensor& src) {
  if (cols.empty()) return;
  bool consecutive = true;
  for (size_t i = 1; i < cols.size(); ++i) consecutive = consecutive && cols[i] == cols[i - 1] + 1;
  if (consecutive) {
    dst.slice(0, cols[0], cols[0] + static_cast<int64_t>(cols.size())).copy_(src);
  } else {
    for (size_t i = 0; i < cols.size(); ++i) dst.select(0, cols[i]).copy_(src.select(0, static_cast<int64_t>(i)));
  }
}

struct Cols {
  std::vector<int64_t> z, pool;
  int64_t identity;
};

Cols read_cols(at::IntArrayRef cols) {
  Cols c;
  const int64_t P = cols[0];
  c.z.assign(cols.begin() + 1, cols.begin() + 1 + P);
  c.pool.assign(cols.begin() + 1 + P, cols.begin() + 3 + P);
  c.identity = cols[3 + P];
  return c;
}

// The adarts_C kernels accumulate in float32 themselves and run with autocast off, as the Python
// kernel wrappers (adarts_kernels/ops/_common.py: autocast_off) run them; the ATen operations
// between them see the caller's autocast state, as they do in Python.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// the adarts_C kernels, through the dispatcher (CPU or CUDA by the tensors' device)
Tensor gather_fwd(const Tensor& x, const Tensor& a, const Tensor& idx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_gather_fwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&)>();
  const NoAutocast guard;
  return op.call(x, a, idx);
}

std::tuple<Tensor, Tensor> gather_bwd(const Tensor& g, const Tensor& x, const Tensor& a, const Tensor& idx) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_gather_bwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>();
  const NoAutocast guard;
  return op.call(g, x, a, idx);
}

std::tuple<Tensor, Tensor> score_fwd(const Tensor& x, const Tensor& w1, const Tensor& w2, int64_t n) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_score_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t)>();
  const NoAutocast guard;
  return op.call(x, w1, w2, n);
}

std::tuple<Tensor, Tensor, Tensor> score_bwd(const Tensor& g, const Tensor& x, const Tensor& w1, const Tensor& w2,
                                             const Tensor& a) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_score_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&)>();
  const NoAutocast guard;
  return op.call(g, x, w1, w2, a);
}

Tensor writeback_fwd(const Tensor& x, const Tensor& a, const Tensor& idx, const Tensor& y,
                     const std::optional<Tensor>& beta, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_writeback_fwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const std::optional<Tensor>&, int64_t)>();
  const NoAutocast guard;
  return op.call(x, a, idx, y, beta, stride);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> writeback_bwd(const Tensor& g, const Tensor& x, const Tensor& a,
                                                         const Tensor& idx, const Tensor& y,
                                                         const std::optional<Tensor>& beta, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::attention_writeback_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, int64_t)>();
  const NoAutocast guard;
  return op.call(g, x, a, idx, y, beta, stride);
}

std::tuple<Tensor, Tensor, Tensor> mixed_fwd(const TL& z, const Tensor& x, const Tensor& zw, const Tensor& pw,
                                             const std::optional<Tensor>& iw, int64_t stride, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::mixed_sum_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(
                           at::TensorList, const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                           int64_t, double, const std::optional<Tensor>&, const std::optional<Tensor>&)>();
  const NoAutocast guard;
  return op.call(z, x, zw, pw, iw, stride, eps, c10::nullopt, c10::nullopt);
}

std::tuple<TL, Tensor, Tensor, Tensor, Tensor> mixed_bwd(const Tensor& g, const TL& z, const Tensor& x,
                                                         const Tensor& zw, const Tensor& pw,
                                                         const std::optional<Tensor>& iw, const Tensor& mean,
                                                         const Tensor& var, int64_t stride, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adarts_C::mixed_sum_bwd", "")
                       .typed<std::tuple<TL, Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, at::TensorList, const Tensor&, const Tensor&, const Tensor&,
                           const std::optional<Tensor>&, const Tensor&, const Tensor&, int64_t, double, bool)>();
  const NoAutocast guard;
  return op.call(g, z, x, zw, pw, iw, mean, var, stride, eps, true);
}

std::optional<Tensor> identity_weight(const Tensor& w, const Cols& c) {
  if (c.identity < 0) return c10::nullopt;
  return w.select(0, c.identity);
}

}  // namespace

// Without a: the attention first, by adarts_C::attention_score_fwd, and without idx its own
// top-n_select channels (with idx: those, as a re-run of a forward already made).
// running: the running statistics to move from the batch statistics, as BatchNorm2d's training
// forward does (empty: the caller moves them): the running means of the mixed sum's rows and of
// the sep_convs' first BNs in the order of the returned statistics, then their running variances,
// then their num_batches_tracked; momentum: their common momentum; count: values per channel.
// Returns [out (empty when replay), xs, y, mean, var, z_0..z_{P-1}, per sep (u, mean1, var1, rstd1[, h, t]),
//          with keep: r, then one depthwise output per chain (an empty tensor for other chains),
//          and, without a given a: a and idx last].
TL edge_fwd(const Tensor& x, const std::optional<Tensor>& a_, const std::optional<Tensor>& idx_, int64_t n_select,
            at::TensorList params, const Tensor& weights, const std::optional<Tensor>& ew, at::IntArrayRef specs,
            at::IntArrayRef seps, at::IntArrayRef cols_, int64_t stride, double eps, at::ArrayRef<double> sep_eps,
            bool keep, bool replay, bool channels_last, at::TensorList running, double momentum, bool merge) {
  const at::ScalarType dt = x.scalar_type();
  const Cols c = read_cols(cols_);
  Tensor a, idx;
  const bool select = !a_.has_value();
  if (select) {
    auto sc = score_fwd(x.contiguous(), as(params[0], dt).flatten(1).contiguous(),
                        as(params[1], dt).flatten(1).contiguous(), n_select);
    a = std::get<0>(sc);
    idx = idx_.has_value() ? *idx_ : std::get<1>(sc);
  } else {
    a = *a_;
    idx = *idx_;
  }
  const int64_t n_chains = static_cast<int64_t>(specs.size()) / 4, n_seps = static_cast<int64_t>(seps.size()) / 4;
  Tensor xs = gather_fwd(x.contiguous(), a.contiguous(), idx.contiguous());
  // the shared ReLU and the chains (units.relu_convs_fwd)
  Tensor r = layout(at::relu(xs), channels_last);
  TL ws;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) ws.push_back(as(params[i], xs.scalar_type()));
  TL zs(n_chains), ts(n_chains);
  std::vector<int64_t> offs(n_chains);
  int64_t at_w = 2;
  for (int64_t i = 0; i < n_chains; ++i) {
    offs[i] = at_w;
    at_w += n_weights(specs.data() + 4 * i);
  }
  for (const auto& g : chain_groups(specs, ws, merge)) {
    if (g.size() == 1) {
      const int64_t i = g[0];
      const int64_t* sp = specs.data() + 4 * i;
      auto zt = chain_fwd(r, sp, ws[offs[i]], n_weights(sp) == 2 ? ws[offs[i] + 1] : Tensor());
      zs[i] = zt.first;
      ts[i] = zt.second;
    } else {
      TL w0s, w1s;
      for (int64_t i : g) {
        w0s.push_back(ws[offs[i]]);
        w1s.push_back(ws[offs[i] + 1]);
      }
      const int64_t* sp = specs.data() + 4 * g[0];
      auto zt = group_fwd(r, sp[1], sp[3], w0s, w1s, channels_last, false);
      for (size_t j = 0; j < g.size(); ++j) {
        zs[g[j]] = zt.first[j];
        ts[g[j]] = zt.second;
      }
    }
  }
  // the sep_convs' second halves (units.seps_fwd, batch statistics; merged where it pays)
  TL us, wds, wps;
  for (int64_t i = 0; i < n_seps; ++i) {
    us.push_back(zs[seps[4 * i]]);
    wds.push_back(params[at_w + 2 * i]);
    wps.push_back(params[at_w + 2 * i + 1]);
  }
  std::vector<TL> per_sep(n_seps);   // u, mean1, var1, rstd1[, h, t]
  for (const auto& g : sep_groups(seps, us, wds, wps, merge)) {
    TL hs;
    for (int64_t i : g) {
      const Tensor& u = us[i];
      const at::ScalarType acc = acc_type(u.scalar_type());
      auto vm = at::var_mean(as(u, acc), at::IntArrayRef{0, 2, 3}, /*unbiased=*/false);
      Tensor var1 = std::get<0>(vm), mean1 = std::get<1>(vm);
      Tensor rstd1 = at::rsqrt(var1 + sep_eps[i]);
      hs.push_back(
          layout(at::relu(as((as(u, acc) - channel(mean1)) * channel(rstd1), u.scalar_type())), channels_last));
      per_sep[i] = {u, mean1, var1, rstd1};
    }
    const int64_t* sp = seps.data() + 4 * g[0];
    const at::ScalarType udt = us[g[0]].scalar_type();
    if (g.size() == 1) {
      const int64_t i = g[0];
      const int64_t dwpw[4] = {kDwPw, sp[1], sp[2], sp[3]};
      auto zt = chain_fwd(hs[0], dwpw, as(wds[i], udt), as(wps[i], udt));
      zs[sp[0]] = zt.first;
      if (keep) per_sep[i].insert(per_sep[i].end(), {hs[0], zt.second});
      continue;
    }
    Tensor h = layout(at::cat(hs, 1), channels_last);
    hs.clear();
    TL w0s, w1s;
    for (int64_t i : g) {
      w0s.push_back(as(wds[i], udt));
      w1s.push_back(as(wps[i], udt));
    }
    auto zt = group_fwd(h, sp[1], sp[3], w0s, w1s, channels_last, true);
    for (size_t j = 0; j < g.size(); ++j) {
      const int64_t i = g[j];
      zs[seps[4 * i]] = zt.first[j];
      if (keep) per_sep[i].insert(per_sep[i].end(), {h, zt.second});
    }
  }
  TL sep_out;
  for (const auto& e : per_sep) sep_out.insert(sep_out.end(), e.begin(), e.end());
  for (auto& z : zs) z = z.contiguous();   // the mixed sum reads NCHW; keep those
  Tensor zw = columns(weights, c.z), pw = columns(weights, c.pool);
  auto ms = mixed_fwd(zs, xs, zw.contiguous(), pw.contiguous(), identity_weight(weights, c), stride, eps);
  Tensor y = std::get<0>(ms);
  if (!running.empty()) {   // units/batchnorm.update_running_stats_rows, in one place
    const size_t q = running.size() / 3;
    TL rows_m = std::get<1>(ms).unbind(0), rows_v = std::get<2>(ms).unbind(0);
    for (size_t i = 0; i < sep_out.size(); i += keep ? 6 : 4) {
      rows_m.push_back(sep_out[i + 1]);
      rows_v.push_back(sep_out[i + 2]);
    }
    TORCH_CHECK(rows_m.size() == q, "adarts edge_fwd: ", q, " running statistics for ", rows_m.size(), " BatchNorms");
    const int64_t count = xs.size(0) * (xs.size(2) / stride) * (xs.size(3) / stride);
    const double factor = static_cast<double>(count) / static_cast<double>(std::max<int64_t>(count - 1, 1));
    TL nbt(running.begin() + 2 * q, running.end());
    at::_foreach_add_(nbt, 1);
    TL unbiased = at::_foreach_mul(rows_v, factor);
    TL dst(running.begin(), running.begin() + 2 * q);
    TL src(rows_m);
    src.insert(src.end(), unbiased.begin(), unbiased.end());
    at::_foreach_lerp_(dst, src, momentum);
  }
  TL out;
  if (replay) {
    out.push_back(at::empty({0}, x.options()));
  } else {
    std::optional<Tensor> ewd = ew.has_value() ? std::optional<Tensor>(as(*ew, dt).contiguous()) : c10::nullopt;
    out.push_back(writeback_fwd(x.contiguous(), a.contiguous(), idx.contiguous(), y.contiguous(), ewd, stride));
  }
  out.insert(out.end(), {xs, y, std::get<1>(ms), std::get<2>(ms)});
  out.insert(out.end(), zs.begin(), zs.end());
  out.insert(out.end(), sep_out.begin(), sep_out.end());
  if (keep) {
    out.push_back(r);
    for (auto& t : ts) out.push_back(t.defined() ? t : at::empty({0}, x.options()));
  }
  if (select) out.insert(out.end(), {a, idx});
  return out;
}

// Returns [dx, dweights (in the z weights' dtype), dbeta (empty without ew), one gradient per param].
TL edge_bwd(const Tensor& grad, const Tensor& x, const Tensor& a, const Tensor& idx, const Tensor& xs, const Tensor& y,
            const Tensor& mean, const Tensor& var, const std::optional<Tensor>& ew, const Tensor& weights,
            at::TensorList params, at::TensorList zs_, at::TensorList sep_state, at::TensorList kept,
            at::IntArrayRef specs, at::IntArrayRef seps, at::IntArrayRef cols_, int64_t stride, double eps,
            bool channels_last, bool flip, bool merge) {
  const at::ScalarType dt = x.scalar_type();
  const Cols c = read_cols(cols_);
  const int64_t n_chains = static_cast<int64_t>(specs.size()) / 4, n_seps = static_cast<int64_t>(seps.size()) / 4;
  const bool keep = !kept.empty();
  std::optional<Tensor> ewd = ew.has_value() ? std::optional<Tensor>(as(*ew, dt).contiguous()) : c10::nullopt;
  auto wb = writeback_bwd(grad.contiguous(), x.contiguous(), a.contiguous(), idx.contiguous(), y.contiguous(), ewd,
                          stride);
  Tensor dx_wb = std::get<0>(wb), da_wb = std::get<1>(wb), dy = std::get<2>(wb), dbeta = std::get<3>(wb);
  TL zs(zs_.begin(), zs_.end());
  for (auto& z : zs) z = z.contiguous();
  Tensor zw = columns(weights, c.z).contiguous(), pw = columns(weights, c.pool).contiguous();
  std::optional<Tensor> iw = identity_weight(weights, c);
  if (iw.has_value()) iw = iw->contiguous();
  auto mb = mixed_bwd(dy.contiguous(), zs, xs.contiguous(), zw, pw, iw, mean.contiguous(), var.contiguous(), stride,
                      eps);
  TL gzs = std::get<0>(mb);
  Tensor dxs_ms = std::get<1>(mb), dzw = std::get<2>(mb), dpw = std::get<3>(mb), diw = std::get<4>(mb);
  // the sep_convs' second halves (units.bn_relu_dw_pw_bwd, batch statistics)
  int64_t n_first = 0;
  for (int64_t i = 0; i < n_chains; ++i) n_first += n_weights(specs.data() + 4 * i);
  // (units.seps_bwd: grouped as the forward grouped them)
  const int64_t per = keep ? 5 : 3, at_w0 = 2 + n_first;
  TL us, wds, wps;
  for (int64_t i = 0; i < n_seps; ++i) {
    us.push_back(sep_state[per * i]);
    wds.push_back(params[at_w0 + 2 * i]);
    wps.push_back(params[at_w0 + 2 * i + 1]);
  }
  TL dsep(2 * n_seps);
  // the folded BN's backward of half i from dh, the gradient of its normalised ReLU output
  auto bn_bwd = [&](int64_t i, const Tensor& dh, const Tensor& uh) {
    const Tensor& rstd1 = sep_state[per * i + 2];
    const at::ScalarType udt = us[i].scalar_type(), acc = acc_type(udt);
    Tensor g = as(dh, acc) * uh.gt(0);
    g = g - g.mean({0, 2, 3}, true) - uh * (g * uh).mean({0, 2, 3}, true);
    gzs[seps[4 * i]] = as(g * channel(rstd1), udt);
  };
  for (const auto& g : sep_groups(seps, us, wds, wps, merge)) {
    TL uhs;
    for (int64_t i : g) {
      const at::ScalarType acc = acc_type(us[i].scalar_type());
      uhs.push_back((as(us[i], acc) - channel(sep_state[per * i + 1])) * channel(sep_state[per * i + 2]));
    }
    const int64_t* sp = seps.data() + 4 * g[0];
    const at::ScalarType udt = us[g[0]].scalar_type();
    if (g.size() == 1) {
      const int64_t i = g[0];
      Tensor h, t;
      if (keep) {
        h = sep_state[per * i + 3];
        t = sep_state[per * i + 4];
      } else {
        h = layout(as(at::relu(uhs[0]), udt), channels_last);
      }
      const int64_t dwpw[4] = {kDwPw, sp[1], sp[2], sp[3]};
      auto cb = chain_bwd(layout(as(gzs[sp[0]], udt), channels_last), h, dwpw, as(wds[i], udt), as(wps[i], udt), t,
                          flip);
      bn_bwd(i, std::get<0>(cb), uhs[0]);
      dsep[2 * i] = grad_like(std::get<1>(cb), wds[i]);
      dsep[2 * i + 1] = grad_like(std::get<2>(cb), wps[i]);
      continue;
    }
    Tensor h, t;
    if (keep) {
      h = sep_state[per * g[0] + 3];
      t = sep_state[per * g[0] + 4];
    } else {
      TL hs;
      for (const auto& uh : uhs) hs.push_back(layout(as(at::relu(uh), udt), channels_last));
      h = layout(at::cat(hs, 1), channels_last);
    }
    TL gs, w0s, w1s;
    for (int64_t i : g) {
      gs.push_back(layout(as(gzs[seps[4 * i]], udt), channels_last));
      w0s.push_back(as(wds[i], udt));
      w1s.push_back(as(wps[i], udt));
    }
    auto gb = group_bwd(gs, h, sp[1], sp[3], w0s, w1s, t, channels_last, true);
    t.reset();
    const int64_t m = static_cast<int64_t>(g.size());
    for (int64_t j = 0; j < m; ++j) {
      const int64_t i = g[j];
      bn_bwd(i, part(std::get<0>(gb), j, m, true), uhs[j]);
      dsep[2 * i] = grad_like(std::get<1>(gb)[j], wds[i]);
      dsep[2 * i + 1] = grad_like(std::get<2>(gb)[j], wps[i]);
    }
  }
  // the shared ReLU and the chains (units.relu_convs_bwd)
  const at::ScalarType xdt = xs.scalar_type();
  Tensor r = keep ? kept[0] : layout(at::relu(xs), channels_last);
  Tensor dr;
  TL xws;
  for (int64_t i = 0; i < 2 + n_first; ++i) xws.push_back(i < 2 ? params[i] : as(params[i], xdt));
  TL dfirst(n_first);
  std::vector<int64_t> offs(n_chains);
  int64_t at_w = 2;
  for (int64_t i = 0; i < n_chains; ++i) {
    offs[i] = at_w;
    at_w += n_weights(specs.data() + 4 * i);
  }
  for (const auto& g : chain_groups(specs, xws, merge)) {
    Tensor d;
    if (g.size() == 1) {
      const int64_t i = g[0];
      const int64_t* sp = specs.data() + 4 * i;
      const int64_t nw = n_weights(sp), o = offs[i];
      Tensor t = (keep && sp[0] == kDwPw) ? kept[1 + i] : Tensor();
      auto cb = chain_bwd(layout(as(gzs[i], xdt), channels_last), r, sp, xws[o], nw == 2 ? xws[o + 1] : Tensor(), t,
                          flip);
      d = std::get<0>(cb);
      dfirst[o - 2] = grad_like(std::get<1>(cb), params[o]);
      if (nw == 2) dfirst[o - 1] = grad_like(std::get<2>(cb), params[o + 1]);
    } else {
      TL gs, w0s, w1s;
      for (int64_t i : g) {
        gs.push_back(layout(as(gzs[i], xdt), channels_last));
        w0s.push_back(xws[offs[i]]);
        w1s.push_back(xws[offs[i] + 1]);
      }
      const int64_t* sp = specs.data() + 4 * g[0];
      auto gb = group_bwd(gs, r, sp[1], sp[3], w0s, w1s, keep ? kept[1 + g[0]] : Tensor(), channels_last, false);
      d = std::get<0>(gb);
      for (size_t j = 0; j < g.size(); ++j) {
        const int64_t o = offs[g[j]];
        dfirst[o - 2] = grad_like(std::get<1>(gb)[j], params[o]);
        dfirst[o - 1] = grad_like(std::get<2>(gb)[j], params[o + 1]);
      }
    }
    dr = dr.defined() ? dr + d : d;
  }
  Tensor dxs = dxs_ms + dr * xs.gt(0);
  auto gb = gather_bwd(dxs.contiguous(), x.contiguous(), a.contiguous(), idx.contiguous());
  Tensor da = da_wb + std::get<1>(gb);
  Tensor w1 = as(params[0], dt).flatten(1).contiguous(), w2 = as(params[1], dt).flatten(1).contiguous();
  auto sb = score_bwd(da.contiguous(), x.contiguous(), w1, w2, a.contiguous());
  Tensor dx = dx_wb + std::get<0>(gb) + std::get<0>(sb);
  Tensor dw = at::zeros(weights.sizes(), dzw.options());
  put(dw, c.z, dzw);
  put(dw, c.pool, dpw);
  if (c.identity >= 0) dw.select(0, c.identity).copy_(diw);
  TL out{dx, dw, ew.has_value() ? as(dbeta, ew->scalar_type()) : at::empty({0}, x.options())};
  out.push_back(as(std::get<1>(sb).reshape(params[0].sizes()), params[0].scalar_type()));
  out.push_back(as(std::get<2>(sb).reshape(params[1].sizes()), params[1].scalar_type()));
  out.insert(out.end(), dfirst.begin(), dfirst.end());
  out.insert(out.end(), dsep.begin(), dsep.end());
  return out;
}

TORCH_LIBRARY_FRAGMENT(adarts_C, m) {
  m.def("edge_fwd(Tensor x, Tensor? a, Tensor? idx, int n_select, Tensor[] params, Tensor weights, Tensor? ew, "
        "int[] specs, "
        "int[] seps, int[] cols, int stride, float eps, float[] sep_eps, bool keep, bool replay, "
        "bool channels_last, Tensor[] running, float momentum, bool merge) -> Tensor[]");
  m.def("edge_bwd(Tensor grad, Tensor x, Tensor a, Tensor idx, Tensor xs, Tensor y, Tensor mean, Tensor var, "
        "Tensor? ew, Tensor weights, Tensor[] params, Tensor[] zs, Tensor[] sep_state, Tensor[] kept, int[] specs, "
        "int[] seps, int[] cols, int stride, float eps, bool channels_last, bool flip, bool merge) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(adarts_C, CompositeExplicitAutograd, m) {
  m.impl("edge_fwd", TORCH_FN(edge_fwd));
  m.impl("edge_bwd", TORCH_FN(edge_bwd));
}

}  // namespace adarts
