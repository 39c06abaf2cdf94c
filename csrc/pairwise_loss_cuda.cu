// CUDA kernels of the fused pairwise reward loss.
// forward: one warp per pair reads both gathered rows once, reduces with shuffles and writes rewards and
//          the per-pair loss.
// backward: a 2-D grid of (row block, column block); each thread owns one column, writes that column of
//           d_hidden for the block's rows and a partial of d_weight; partials are summed afterwards.
#include "pairwise_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <initializer_list>
#include <utility>

namespace rmfast {
namespace {

constexpr int kWarp = 32;
constexpr int kFwdThreads = 256;
constexpr int kBwdThreads = 256;
constexpr int kBwdRows = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void pairwise_fwd_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ w,
                                    const acc_t* __restrict__ bias, const int64_t* __restrict__ chosen,
                                    const int64_t* __restrict__ rejected, const acc_t* __restrict__ margin,
                                    const acc_t* __restrict__ log_nu, const bool* __restrict__ tie,
                                    acc_t* __restrict__ rc, acc_t* __restrict__ rr, acc_t* __restrict__ loss,
                                    int64_t P, int64_t D, int64_t sn, int64_t sd) {
  const int64_t pair = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pair >= P) return;
  const scalar_t* hc = h + chosen[pair] * sn;
  const scalar_t* hr = h + rejected[pair] * sn;
  acc_t ac = 0, ar = 0;
  for (int64_t j = lane; j < D; j += kWarp) {
    const acc_t wj = w[j];
    ac += static_cast<acc_t>(hc[j * sd]) * wj;
    ar += static_cast<acc_t>(hr[j * sd]) * wj;
  }
  ac = warp_sum(ac);
  ar = warp_sum(ar);
  if (lane == 0) {
    const acc_t b = bias ? bias[0] : acc_t(0);
    const acc_t c = ac + b;
    const acc_t r = ar + b;
    const acc_t diff = c - r - (margin ? margin[pair] : acc_t(0));
    rc[pair] = c;
    rr[pair] = r;
    loss[pair] = comparison_loss<acc_t>(diff, log_nu != nullptr, log_nu ? log_nu[0] : acc_t(0),
                                        tie != nullptr && tie[pair]);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void pairwise_bwd_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ w,
                                    const int64_t* __restrict__ rows, const acc_t* __restrict__ coef,
                                    scalar_t* __restrict__ dh, acc_t* __restrict__ dw_partial, int64_t M,
                                    int64_t D, int64_t sn, int64_t sd) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t last = min(first + kBwdRows, M);
  const acc_t wj = w[j];
  acc_t acc = 0;
  for (int64_t i = first; i < last; ++i) {
    const int64_t row = rows[i];
    if (row < 0) continue;
    const acc_t c = coef[i];
    acc += c * static_cast<acc_t>(h[row * sn + j * sd]);
    if (dh) dh[row * D + j] = static_cast<scalar_t>(c * wj);
  }
  dw_partial[static_cast<int64_t>(blockIdx.x) * D + j] = acc;
}

// The attribute head: one warp per gathered row, the A outputs one after another (the row stays in cache);
// the first pass also copies the row to rows_out (when given), lane 0 writes the outputs and the squared
// error against target (when given).
template <typename scalar_t, typename acc_t>
__global__ void attribute_fwd_kernel(const scalar_t* __restrict__ h, const acc_t* __restrict__ w,
                                     const acc_t* __restrict__ bias, const int64_t* __restrict__ index,
                                     const acc_t* __restrict__ target, const acc_t* __restrict__ response_weight,
                                     acc_t* __restrict__ out, acc_t* __restrict__ sq, acc_t* __restrict__ count,
                                     scalar_t* __restrict__ rows_out, int64_t S, int64_t A, int64_t D, int64_t sn,
                                     int64_t sd) {
  const int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= S) return;
  const scalar_t* row = h + index[s] * sn;
  scalar_t* copy = rows_out ? rows_out + s * D : nullptr;
  for (int64_t a = 0; a < A; ++a) {
    const acc_t* wa = w + a * D;
    acc_t acc = 0;
    for (int64_t j = lane; j < D; j += kWarp) {
      const scalar_t v = row[j * sd];
      if (copy && a == 0) copy[j] = v;
      acc += static_cast<acc_t>(v) * wa[j];
    }
    acc = warp_sum(acc);
    if (lane == 0) out[s * A + a] = acc + (bias ? bias[a] : acc_t(0));
  }
  if (lane == 0 && sq) {
    acc_t e = 0;
    acc_t n = 0;
    for (int64_t a = 0; a < A; ++a) {
      const acc_t y = target[s * A + a];
      if (isfinite(y)) {
        const acc_t d = out[s * A + a] - y;
        e += d * d;
        n += acc_t(1);
      }
    }
    const acc_t ws = response_weight ? response_weight[s] : acc_t(1);
    sq[s] = ws * e;
    count[s] = ws * n;
  }
}

// d_hidden of the attribute head: a thread per column, the rows of its block written in turn.
template <typename scalar_t, typename acc_t>
__global__ void attribute_hidden_grad_kernel(const acc_t* __restrict__ w, const int64_t* __restrict__ rows,
                                             const acc_t* __restrict__ coef, scalar_t* __restrict__ dh,
                                             int64_t M, int64_t A, int64_t D) {
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kBwdRows;
  const int64_t last = min(first + kBwdRows, M);
  for (int64_t i = first; i < last; ++i) {
    const int64_t row = rows[i];
    if (row < 0) continue;
    acc_t acc = 0;
    for (int64_t a = 0; a < A; ++a) acc += coef[i * A + a] * w[a * D + j];
    dh[row * D + j] = static_cast<scalar_t>(acc);
  }
}

// Plackett–Luce: a thread per response k, its risk set's log-sum-exp and weighted term; then a thread per
// response j, dloss/dr_j over the sets it is in. Each reads the group's rewards in place, O(S) per thread.
template <typename acc_t>
__global__ void plackett_luce_lse_kernel(const acc_t* __restrict__ r, const int64_t* __restrict__ g,
                                         const acc_t* __restrict__ sc, const acc_t* __restrict__ w,
                                         acc_t* __restrict__ lse, acc_t* __restrict__ term, int64_t S) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= S) return;
  acc_t top = r[k];
  for (int64_t j = 0; j < S; ++j)
    if (g[j] == g[k] && sc[j] <= sc[k] && r[j] > top) top = r[j];
  acc_t sum = 0;
  for (int64_t j = 0; j < S; ++j)
    if (g[j] == g[k] && sc[j] <= sc[k]) sum += exp(r[j] - top);
  lse[k] = top + log(sum);
  term[k] = w[k] * (lse[k] - r[k]);
}

template <typename acc_t>
__global__ void plackett_luce_coef_kernel(const acc_t* __restrict__ r, const int64_t* __restrict__ g,
                                          const acc_t* __restrict__ sc, const acc_t* __restrict__ w,
                                          const acc_t* __restrict__ lse, acc_t* __restrict__ coef, int64_t S) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= S) return;
  acc_t acc = 0;
  for (int64_t k = 0; k < S; ++k)
    if (g[k] == g[j] && sc[j] <= sc[k]) acc += w[k] * exp(r[j] - lse[k]);
  coef[j] = acc - w[j];
}

// The dispatcher picks these kernels by the first tensor's device: every other input must be on it too (a CPU
// tensor's host pointer read on the device would end the CUDA context, not raise).
void check_on(const at::Tensor& ref, std::initializer_list<std::pair<const char*, const at::Tensor*>> inputs) {
  for (const auto& [name, x] : inputs) {
    TORCH_CHECK(!x->defined() || x->device() == ref.device(), "rmfast: ", name, " is on ", x->device(),
                ", expected ", ref.device(), " (every input of the op on one device)");
  }
}

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& hidden, const at::Tensor& index) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  check_on(hidden, {{"index", &index}});
  return hidden.index_select(0, index);  // the caching allocator: no fresh pages to fault in
}

std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd_cuda(const at::Tensor& rewards, const at::Tensor& group,
                                                          const at::Tensor& scores, const at::Tensor& weight) {
  check_plackett_luce(rewards, group, scores, weight);
  check_on(rewards, {{"group", &group}, {"scores", &scores}, {"weight", &weight}});
  const c10::cuda::CUDAGuard guard(rewards.device());
  const int64_t S = rewards.numel();
  at::Tensor coef = at::empty({S}, rewards.options());
  if (S == 0) return {at::zeros({}, rewards.options()), coef};
  at::Tensor lse = at::empty({S}, rewards.options());
  at::Tensor term = at::empty({S}, rewards.options());
  const at::Tensor r_c = rewards.contiguous();
  const at::Tensor g_c = group.contiguous();
  const at::Tensor s_c = scores.contiguous();
  const at::Tensor w_c = weight.contiguous();
  const dim3 grid(static_cast<unsigned>((S + kFwdThreads - 1) / kFwdThreads));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "plackett_luce_fwd_cuda", [&] {
    plackett_luce_lse_kernel<scalar_t><<<grid, kFwdThreads, 0, stream>>>(
        r_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<int64_t>(), s_c.const_data_ptr<scalar_t>(),
        w_c.const_data_ptr<scalar_t>(), lse.mutable_data_ptr<scalar_t>(), term.mutable_data_ptr<scalar_t>(), S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    plackett_luce_coef_kernel<scalar_t><<<grid, kFwdThreads, 0, stream>>>(
        r_c.const_data_ptr<scalar_t>(), g_c.const_data_ptr<int64_t>(), s_c.const_data_ptr<scalar_t>(),
        w_c.const_data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), coef.mutable_data_ptr<scalar_t>(), S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {term.sum(), coef};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& log_nu, const std::optional<at::Tensor>& tie) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t D = hidden.size(1);
  const int64_t P = chosen.numel();
  TORCH_CHECK(!tie.has_value() || (tie->scalar_type() == at::kBool && tie->numel() == P),
              "rmfast: tie must be a bool tensor [P]");
  TORCH_CHECK(!log_nu.has_value() || log_nu->numel() == 1, "rmfast: log_nu must hold one value");
  const at::Tensor none;
  check_on(hidden, {{"weight", &weight}, {"bias", bias ? &*bias : &none}, {"chosen", &chosen},
                    {"rejected", &rejected}, {"margin", margin ? &*margin : &none},
                    {"log_nu", log_nu ? &*log_nu : &none}, {"tie", tie ? &*tie : &none}});
  at::Tensor rc = at::empty({P}, weight.options());
  at::Tensor rr = at::empty({P}, weight.options());
  at::Tensor loss = at::empty({P}, weight.options());
  if (P == 0) return {rc, rr, loss};  // a grid of no blocks is a launch error
  const at::Tensor ci = chosen.contiguous();
  const at::Tensor ri = rejected.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor m = margin.has_value() ? margin->contiguous() : at::Tensor();
  const at::Tensor nu = log_nu.has_value() ? log_nu->contiguous() : at::Tensor();
  const at::Tensor t = tie.has_value() ? tie->contiguous() : at::Tensor();
  const int64_t pairs_per_block = kFwdThreads / kWarp;
  const dim3 grid(static_cast<unsigned>((P + pairs_per_block - 1) / pairs_per_block));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "pairwise_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pairwise_fwd_kernel<scalar_t, acc_t><<<grid, kFwdThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, ci.const_data_ptr<int64_t>(),
        ri.const_data_ptr<int64_t>(), m.defined() ? m.const_data_ptr<acc_t>() : nullptr,
        nu.defined() ? nu.const_data_ptr<acc_t>() : nullptr, t.defined() ? t.const_data_ptr<bool>() : nullptr,
        rc.mutable_data_ptr<acc_t>(), rr.mutable_data_ptr<acc_t>(), loss.mutable_data_ptr<acc_t>(), P, D,
        hidden.stride(0), hidden.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rc, rr, loss};
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t N = hidden.size(0);
  const int64_t D = hidden.size(1);
  const int64_t M = rows.numel();
  check_on(hidden, {{"weight", &weight}, {"rows", &rows}, {"coef", &coef}});
  at::Tensor d_hidden = need_hidden_grad ? at::zeros({N, D}, hidden.options()) : at::empty({0}, hidden.options());
  if (M == 0 || D == 0) return {d_hidden, at::zeros({D}, weight.options())};  // no blocks to launch
  const int64_t row_blocks = (M + kBwdRows - 1) / kBwdRows;
  at::Tensor partial = at::empty({row_blocks, D}, weight.options());
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor coef_c = coef.contiguous();
  const at::Tensor w = weight.contiguous();
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>((D + kBwdThreads - 1) / kBwdThreads));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "pairwise_loss_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    pairwise_bwd_kernel<scalar_t, acc_t><<<grid, kBwdThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), rows_c.const_data_ptr<int64_t>(),
        coef_c.const_data_ptr<acc_t>(), need_hidden_grad ? d_hidden.mutable_data_ptr<scalar_t>() : nullptr,
        partial.mutable_data_ptr<acc_t>(), M, D, hidden.stride(0), hidden.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor d_weight = row_blocks == 1 ? partial.view({D}) : partial.sum(0);
  return {d_hidden, d_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attribute_head_fwd_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& index,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& response_weight, bool gather) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "rmfast: hidden must be [N, D] and weight [A, D]");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t D = hidden.size(1);
  const int64_t A = weight.size(0);
  const int64_t S = index.numel();
  check_attribute_target(target, response_weight, weight, S);
  const at::Tensor none;
  check_on(hidden, {{"weight", &weight}, {"bias", bias ? &*bias : &none}, {"index", &index},
                    {"target", target ? &*target : &none},
                    {"response_weight", response_weight ? &*response_weight : &none}});
  at::Tensor out = at::empty({S, A}, weight.options());
  // per-row squared error and count, summed after the kernel (a deterministic reduction)
  at::Tensor per_row = at::zeros({2, target.has_value() ? S : 0}, weight.options());
  at::Tensor rows = gather ? at::empty({S, D}, hidden.options()) : at::empty({0}, hidden.options());
  const at::Tensor t = target.has_value() ? target->contiguous() : at::Tensor();
  const at::Tensor rw = response_weight.has_value() ? response_weight->contiguous() : at::Tensor();
  const at::Tensor idx = index.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows_per_block = kFwdThreads / kWarp;
  const dim3 grid(static_cast<unsigned>((S + rows_per_block - 1) / rows_per_block));
  if (S == 0) return {out, target.has_value() ? per_row.sum(1) : at::empty({0}, weight.options()), rows};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "attribute_head_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "rmfast: weight must be in the accumulation dtype");
    attribute_fwd_kernel<scalar_t, acc_t><<<grid, kFwdThreads, 0, stream>>>(
        hidden.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, idx.const_data_ptr<int64_t>(),
        t.defined() ? t.const_data_ptr<acc_t>() : nullptr, rw.defined() ? rw.const_data_ptr<acc_t>() : nullptr,
        out.mutable_data_ptr<acc_t>(), t.defined() ? per_row.mutable_data_ptr<acc_t>() : nullptr,
        t.defined() ? per_row.mutable_data_ptr<acc_t>() + S : nullptr,
        gather ? rows.mutable_data_ptr<scalar_t>() : nullptr, S, A, D, hidden.stride(0), hidden.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, t.defined() ? per_row.sum(1) : at::empty({0}, weight.options()), rows};
}

at::Tensor attribute_head_hidden_grad_cuda(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                           const at::Tensor& coef) {
  TORCH_CHECK(like.dim() == 2 && weight.dim() == 2, "rmfast: like must be [N, D] and weight [A, D]");
  const c10::cuda::CUDAGuard guard(like.device());
  const int64_t N = like.size(0);
  const int64_t D = like.size(1);
  const int64_t A = weight.size(0);
  const int64_t M = rows.numel();
  check_on(like, {{"weight", &weight}, {"rows", &rows}, {"coef", &coef}});
  at::Tensor d_hidden = at::zeros({N, D}, like.options());
  if (M == 0 || D == 0) return d_hidden;
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor coef_c = coef.contiguous();
  const at::Tensor w = weight.contiguous();
  const dim3 grid(static_cast<unsigned>((M + kBwdRows - 1) / kBwdRows),
                  static_cast<unsigned>((D + kBwdThreads - 1) / kBwdThreads));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "attribute_head_hidden_grad_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value &&
                    coef.scalar_type() == weight.scalar_type(),
                "rmfast: weight and coef must be in the accumulation dtype");
    attribute_hidden_grad_kernel<scalar_t, acc_t><<<grid, kBwdThreads, 0, stream>>>(
        w.const_data_ptr<acc_t>(), rows_c.const_data_ptr<int64_t>(), coef_c.const_data_ptr<acc_t>(),
        d_hidden.mutable_data_ptr<scalar_t>(), M, A, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return d_hidden;
}

}  // namespace rmfast
