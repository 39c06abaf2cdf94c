// Registers the kernels as torch operators (torch.ops.rmfast.*) with a CPU and, when built with CUDA, a
// CUDA implementation, and exposes what was built to Python. rmfast/_extension.py is the only importer.
#include <torch/extension.h>
#include <torch/library.h>

#include "pairwise_loss.h"

TORCH_LIBRARY(rmfast, m) {
  m.def(
      "pairwise_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor chosen, Tensor rejected, "
      "Tensor? margin, Tensor? log_nu=None, Tensor? tie=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "pairwise_loss_bwd(Tensor hidden, Tensor weight, Tensor rows, Tensor coef, bool need_hidden_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "attribute_head_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor index, Tensor? target=None, "
      "Tensor? response_weight=None, bool gather=False) -> (Tensor, Tensor, Tensor)");
  m.def("attribute_head_hidden_grad(Tensor like, Tensor weight, Tensor rows, Tensor coef) -> Tensor");
  m.def("plackett_luce_fwd(Tensor rewards, Tensor group, Tensor scores, Tensor weight) -> (Tensor, Tensor)");
  m.def("gather_rows(Tensor hidden, Tensor index) -> Tensor");
}

TORCH_LIBRARY_IMPL(rmfast, CPU, m) {
  m.impl("pairwise_loss_fwd", &rmfast::pairwise_loss_fwd_cpu);
  m.impl("pairwise_loss_bwd", &rmfast::pairwise_loss_bwd_cpu);
  m.impl("attribute_head_fwd", &rmfast::attribute_head_fwd_cpu);
  m.impl("attribute_head_hidden_grad", &rmfast::attribute_head_hidden_grad_cpu);
  m.impl("plackett_luce_fwd", &rmfast::plackett_luce_fwd_cpu);
  m.impl("gather_rows", &rmfast::gather_rows_cpu);
}

#ifdef RMFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rmfast, CUDA, m) {
  m.impl("pairwise_loss_fwd", &rmfast::pairwise_loss_fwd_cuda);
  m.impl("pairwise_loss_bwd", &rmfast::pairwise_loss_bwd_cuda);
  m.impl("attribute_head_fwd", &rmfast::attribute_head_fwd_cuda);
  m.impl("attribute_head_hidden_grad", &rmfast::attribute_head_hidden_grad_cuda);
  m.impl("plackett_luce_fwd", &rmfast::plackett_luce_fwd_cuda);
  m.impl("gather_rows", &rmfast::gather_rows_cuda);
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef RMFAST_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  info["parallel"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rmfast compiled kernels (CPU, and CUDA when built with it)";
  m.def("build_info", &build_info, "What this build of the extension contains.");
}
