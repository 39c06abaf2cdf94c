// Kernel-level contract shared by the CPU and CUDA implementations of the fused pairwise reward loss.
//
// forward(hidden [N, D] any strides, weight [D] acc, bias [1] acc or none, chosen [P] int64,
//         rejected [P] int64, margin [P] acc or none)
//   -> (chosen_rewards [P] acc, rejected_rewards [P] acc, loss [P] acc)
//   loss_p = softplus(-(r_c - r_r - m_p)); acc is float32, or float64 for float64 hidden.
//
// backward(hidden [N, D], weight [D] acc, rows [M] int64, coef [M] acc, need_hidden_grad)
//   -> (d_hidden [N, D] contiguous in hidden's dtype (zeros except the listed rows; empty when not
//       needed), d_weight [D] acc)
//   rows lists gathered rows (-1 marks an entry to skip) and coef the summed dL/dr of each; a row may be
//   listed more than once only with the same coefficient (rmfast/loss.py sums them first), so d_hidden
//   rows are written, never accumulated, and the writes of repeated entries agree: no atomics are needed.
//   hidden may be a stride-0 expansion of one row (the head, when only d_hidden is wanted).
#pragma once

#include <torch/types.h>

#include <tuple>

namespace rmfast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin);

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad);

// The attribute head (A outputs), the same gather:
// attribute_head_fwd(hidden [N, D] any strides, weight [A, D] acc, bias [A] acc or none, index [S] int64)
//   -> out [S, A] acc, out[s, a] = hidden[index[s]] · weight[a] + bias[a].
// attribute_head_hidden_grad(like [N, D] (its shape and dtype only: a stride-0 expansion will do),
//                            weight [A, D] acc, rows [M] int64, coef [M, A] acc)
//   -> d_hidden [N, D] contiguous in like's dtype: zeros except row rows[i] = Σ_a coef[i, a] · weight[a];
//   a row listed twice carries the same coefficients both times (summed first), so writes agree.
at::Tensor attribute_head_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& index);
at::Tensor attribute_head_hidden_grad_cpu(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                          const at::Tensor& coef);

#ifdef RMFAST_WITH_CUDA
at::Tensor attribute_head_fwd_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const at::Tensor& index);
at::Tensor attribute_head_hidden_grad_cuda(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                           const at::Tensor& coef);

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin);

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad);
#endif

// Numerically stable softplus that keeps NaN: max(x, 0) alone would swallow it, the log1p term does not.
template <typename acc_t>
inline
#ifdef __CUDACC__
    __host__ __device__
#endif
    acc_t softplus_stable(acc_t x) {
  const acc_t pos = x > acc_t(0) ? x : acc_t(0);
  return pos + log1p(exp(-fabs(x)));
}

}  // namespace rmfast
