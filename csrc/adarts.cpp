// adarts_C: operator schemas of the fused ADARTS edge operations, and the Python module
// entry point of the compiled extension adarts_kernels._C.
//
// The kernels register themselves per backend with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp for
// CPU; the CUDA bindings when built with WITH_CUDA). The semantics of every operator are
// those of the plain-PyTorch reference, adarts_kernels/ops/reference.py.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(adarts_C, m) {
  // Channel attention a = sigmoid(MLP(avgpool x) + MLP(maxpool x)) and the top-n channels.
  m.def("attention_score_fwd(Tensor x, Tensor w1, Tensor w2, int n_select) -> (Tensor a, Tensor idx)");
  m.def("attention_score_bwd(Tensor grad_a, Tensor x, Tensor w1, Tensor w2, Tensor a) "
        "-> (Tensor dx, Tensor dw1, Tensor dw2)");
  // x_sel = (x * a)[:, idx], without forming x * a.
  m.def("attention_gather_fwd(Tensor x, Tensor a, Tensor idx) -> Tensor");
  m.def("attention_gather_bwd(Tensor grad, Tensor x, Tensor a, Tensor idx) -> (Tensor dx, Tensor da)");
  // out = beta * (x * a, pooled 2x2 at stride 2) with the selected channels replaced by beta * y.
  m.def("attention_writeback_fwd(Tensor x, Tensor a, Tensor idx, Tensor y, Tensor? beta, int stride) -> Tensor");
  m.def("attention_writeback_bwd(Tensor grad, Tensor x, Tensor a, Tensor idx, Tensor y, Tensor? beta, "
        "int stride) -> (Tensor dx, Tensor da, Tensor dy, Tensor dbeta)");
  // y = sum_q v_q * BN_q(u_q) (+ identity_weight * x), u = [maxpool3x3 x, avgpool3x3 x] + z,
  // v = [pool_weights[0], pool_weights[1]] + z_weights; BN_q affine-free with batch statistics
  // (run_mean/run_var None) or the running ones. didentity_weight: 0-dim, 0 without identity.
  m.def("mixed_sum_fwd(Tensor[] z, Tensor x, Tensor z_weights, Tensor pool_weights, Tensor? identity_weight, "
        "int stride, float eps, Tensor? run_mean, Tensor? run_var) -> (Tensor y, Tensor mean, Tensor var)");
  m.def("mixed_sum_bwd(Tensor grad, Tensor[] z, Tensor x, Tensor z_weights, Tensor pool_weights, "
        "Tensor? identity_weight, Tensor mean, Tensor var, int stride, float eps, bool training) "
        "-> (Tensor[] dz, Tensor dx, Tensor dz_weights, Tensor dpool_weights, Tensor didentity_weight)");
}

// `import adarts_kernels._C` loads this shared library, which runs the registrations above
// and in the kernel files; the module itself is empty. The operators are then reachable as
// torch.ops.adarts_C.<name>. (No pybind11: the ops go through the PyTorch dispatcher.)
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "adarts_kernels._C",                                        // m_name
      "Compiled adarts_C operators (see torch.ops.adarts_C).",   // m_doc
      -1,                                                         // m_size
      nullptr,                                                    // m_methods
      nullptr,                                                    // m_slots
      nullptr,                                                    // m_traverse
      nullptr,                                                    // m_clear
      nullptr,                                                    // m_free
  };
  return PyModule_Create(&module_def);
}
}
