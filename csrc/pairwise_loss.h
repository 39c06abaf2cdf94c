// Kernel-level contract shared by the CPU and CUDA implementations of the fused pairwise reward loss.
//
// forward(hidden [N, D] any strides, weight [D] acc, bias [1] acc or none, chosen [P] int64,
//         rejected [P] int64, margin [P] acc or none, log_nu [1] acc or none, tie [P] bool or none)
//   -> (chosen_rewards [P] acc, rejected_rewards [P] acc, loss [P] acc)
//   with d_p = r_c - r_r - m_p, loss_p = comparison_loss(d_p, ...): Bradley–Terry's softplus(-d_p) without
//   log_nu, Davidson's -log P(outcome) with it (tie marks the tied comparisons; none: no ties).
//   acc is float32, or float64 for float64 hidden.
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
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& log_nu, const std::optional<at::Tensor>& tie);

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad);

// The attribute head (A outputs), the same gather:
// attribute_head_fwd(hidden [N, D] any strides, weight [A, D] acc, bias [A] acc or none, index [S] int64,
//                    target [S, A] acc or none, response_weight [S] acc or none, gather)
//   -> (out [S, A] acc, out[s, a] = hidden[index[s]] · weight[a] + bias[a];
//       sums [2] acc (empty without target): Σ_s w_s Σ_a (out[s, a] - target[s, a])² and Σ_s w_s n_s over the a
//       with a finite target[s, a] (n_s of them; w_s the response weight, 1 without), the regression objective's
//       squared error and its count (a NaN target is a missing value, masked);
//       rows [S, D] contiguous in hidden's dtype (empty unless gather): the gathered rows, copied as they are
//       read, for d_weight).
// attribute_head_hidden_grad(like [N, D] (its shape and dtype only: a stride-0 expansion will do),
//                            weight [A, D] acc, rows [M] int64, coef [M, A] acc)
//   -> d_hidden [N, D] contiguous in like's dtype: zeros except row rows[i] = Σ_a coef[i, a] · weight[a];
//   a row listed twice carries the same coefficients both times (summed first), so writes agree.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attribute_head_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& index,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& response_weight, bool gather);
at::Tensor attribute_head_hidden_grad_cpu(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                          const at::Tensor& coef);

// gather_rows(hidden [N, D] any strides, index [S] int64) -> rows [S, D] contiguous in hidden's dtype: the rows
// d_weight reads, saved by the forward (on CPU into huge-page-backed memory where it is large).
at::Tensor gather_rows_cpu(const at::Tensor& hidden, const at::Tensor& index);

// Plackett–Luce over groups of responses, from the rewards the attribute head (A = 1) gave:
// plackett_luce_fwd(rewards [S] acc, group [S] int64, scores [S] acc, weight [S] acc)
//   -> (loss [] acc, coef [S] acc)
//   lse_k = log Σ_j e^{r_j} over the j with group_j = group_k and scores_j ≤ scores_k (ties share a risk set:
//   Breslow's rule); loss = Σ_k weight_k (lse_k - r_k), weight_k being the response's group's weight over the
//   normaliser; coef_j = dloss/dr_j = Σ_k weight_k [j in k's set] e^{r_j - lse_k} - weight_j. O(S²) pairs of
//   responses, read in place (no [S, S] tensor).
std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd_cpu(const at::Tensor& rewards, const at::Tensor& group,
                                                         const at::Tensor& scores, const at::Tensor& weight);

#ifdef RMFAST_WITH_CUDA
at::Tensor gather_rows_cuda(const at::Tensor& hidden, const at::Tensor& index);

std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd_cuda(const at::Tensor& rewards, const at::Tensor& group,
                                                          const at::Tensor& scores, const at::Tensor& weight);

std::tuple<at::Tensor, at::Tensor, at::Tensor> attribute_head_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& index,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& response_weight, bool gather);
at::Tensor attribute_head_hidden_grad_cuda(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                           const at::Tensor& coef);

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& log_nu, const std::optional<at::Tensor>& tie);

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad);
#endif

inline void check_plackett_luce(const at::Tensor& rewards, const at::Tensor& group, const at::Tensor& scores,
                                const at::Tensor& weight) {
  const int64_t S = rewards.numel();
  TORCH_CHECK(rewards.dim() == 1 && group.numel() == S && scores.numel() == S && weight.numel() == S,
              "rmfast: rewards, group, scores and weight must be [S]");
  TORCH_CHECK(group.scalar_type() == at::kLong, "rmfast: group must be int64");
  TORCH_CHECK(scores.scalar_type() == rewards.scalar_type() && weight.scalar_type() == rewards.scalar_type(),
              "rmfast: scores and weight must be in the rewards' dtype");
}

// Checks shared by the CPU and CUDA attribute_head_fwd: target [S, A] in the accumulation dtype.
inline void check_attribute_target(const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& response_weight, const at::Tensor& weight,
                                   int64_t S) {
  TORCH_CHECK(!target.has_value() || (target->dim() == 2 && target->size(0) == S &&
                                      target->size(1) == weight.size(0) &&
                                      target->scalar_type() == weight.scalar_type()),
              "rmfast: target must be [S, A] in the accumulation dtype");
  TORCH_CHECK(!response_weight.has_value() ||
                  (target.has_value() && response_weight->numel() == S &&
                   response_weight->scalar_type() == weight.scalar_type()),
              "rmfast: response_weight must be [S] in the accumulation dtype, with a target");
}

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

// The loss of one comparison from d = r_c - r_r - m. Bradley–Terry (davidson false): softplus(-d).
// Davidson (ties kept, tie parameter ν = e^{log_nu}): with T = log(e^{d/2} + e^{-d/2} + ν),
// -log P(c wins) = T - d/2 and -log P(tie) = T - log ν; T is a log-sum-exp of three terms, stable at any d.
// A NaN d gives NaN (the exp of it does).
template <typename acc_t>
inline
#ifdef __CUDACC__
    __host__ __device__
#endif
    acc_t comparison_loss(acc_t d, bool davidson, acc_t log_nu, bool tie) {
  if (!davidson) return softplus_stable<acc_t>(-d);
  const acc_t half = d / acc_t(2);
  const acc_t a = fabs(half);
  const acc_t top = a > log_nu ? a : log_nu;
  const acc_t total = top + log(exp(a - top) + exp(-a - top) + exp(log_nu - top));
  return total - (tie ? log_nu : half);
}

}  // namespace rmfast
