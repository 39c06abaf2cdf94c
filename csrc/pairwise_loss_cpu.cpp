// CPU kernels of the fused pairwise reward loss: parallel over pairs (forward) and over hidden columns
// (backward) with at::parallel_for; inner loops are written for the compiler's vectoriser (omp simd).
#include "pairwise_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace rmfast {
namespace {

template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* row, const acc_t* w, int64_t D, int64_t stride_d) {
  acc_t acc = 0;
  if (stride_d == 1) {
_Pragma("omp simd reduction(+ : acc)")
    for (int64_t j = 0; j < D; ++j) acc += static_cast<acc_t>(row[j]) * w[j];
  } else {
    for (int64_t j = 0; j < D; ++j) acc += static_cast<acc_t>(row[j * stride_d]) * w[j];
  }
  return acc;
}

// A zero [N, D] tensor. Large ones come straight from anonymous mmap, whose pages the kernel hands out
// already zeroed on first touch (as calloc does): the backward then pays only for the rows it writes,
// instead of faulting in and memsetting the whole buffer as at::zeros would.
at::Tensor zeros_2d(int64_t N, int64_t D, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kMmapBytes = size_t(1) << 20;
  const size_t bytes = static_cast<size_t>(N) * static_cast<size_t>(D) * options.dtype().itemsize();
  if (bytes >= kMmapBytes) {
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data != MAP_FAILED) {
      return at::from_blob(data, {N, D}, [bytes](void* p) { munmap(p, bytes); }, options);
    }
  }
#endif
  return at::zeros({N, D}, options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const int64_t D = hidden.size(1);
  const int64_t P = chosen.numel();
  const auto acc_options = weight.options();
  at::Tensor rc = at::empty({P}, acc_options);
  at::Tensor rr = at::empty({P}, acc_options);
  at::Tensor loss = at::empty({P}, acc_options);
  const at::Tensor ci = chosen.contiguous();
  const at::Tensor ri = rejected.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = margin.has_value() ? margin->contiguous() : at::Tensor();
  const int64_t sn = hidden.stride(0);
  const int64_t sd = hidden.stride(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "pairwise_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "rmfast: weight must be in the accumulation dtype");
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t b = bias.has_value() ? bias->item<acc_t>() : acc_t(0);
    const acc_t* mp = m.defined() ? m.const_data_ptr<acc_t>() : nullptr;
    const int64_t* cp = ci.const_data_ptr<int64_t>();
    const int64_t* rp = ri.const_data_ptr<int64_t>();
    acc_t* rcp = rc.mutable_data_ptr<acc_t>();
    acc_t* rrp = rr.mutable_data_ptr<acc_t>();
    acc_t* lp = loss.mutable_data_ptr<acc_t>();
    // A pair costs 2·D multiply-adds; keep a task at least ~16K of them.
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(D, 1));
    at::parallel_for(0, P, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const acc_t c = dot_row(h + cp[p] * sn, wp, D, sd) + b;
        const acc_t r = dot_row(h + rp[p] * sn, wp, D, sd) + b;
        const acc_t diff = c - r - (mp ? mp[p] : acc_t(0));
        rcp[p] = c;
        rrp[p] = r;
        lp[p] = softplus_stable<acc_t>(-diff);
      }
    });
  });
  return {rc, rr, loss};
}

std::tuple<at::Tensor, at::Tensor> pairwise_loss_bwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, const at::Tensor& coef,
    bool need_hidden_grad) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const int64_t N = hidden.size(0);
  const int64_t D = hidden.size(1);
  const int64_t M = rows.numel();
  // d_hidden is dense but zero outside the gathered rows: only those are written.
  at::Tensor d_hidden = need_hidden_grad ? zeros_2d(N, D, hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor d_weight = at::empty({D}, weight.options());
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor coef_c = coef.contiguous();
  const at::Tensor w = weight.contiguous();
  const int64_t sn = hidden.stride(0);
  const int64_t sd = hidden.stride(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "pairwise_loss_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const int64_t* rp = rows_c.const_data_ptr<int64_t>();
    const acc_t* cp = coef_c.const_data_ptr<acc_t>();
    scalar_t* dh = need_hidden_grad ? d_hidden.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* dw = d_weight.mutable_data_ptr<acc_t>();
    // Each task owns a block of columns, so d_hidden rows and d_weight entries never collide.
    const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(M, 1));
    at::parallel_for(0, D, grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) dw[j] = acc_t(0);
      for (int64_t i = 0; i < M; ++i) {
        const int64_t row = rp[i];
        if (row < 0) continue;
        const acc_t c = cp[i];
        const scalar_t* hrow = h + row * sn;
        if (sd == 1) {
_Pragma("omp simd")
          for (int64_t j = begin; j < end; ++j) dw[j] += c * static_cast<acc_t>(hrow[j]);
        } else {
          for (int64_t j = begin; j < end; ++j) dw[j] += c * static_cast<acc_t>(hrow[j * sd]);
        }
        if (dh) {
          scalar_t* drow = dh + row * D;
_Pragma("omp simd")
          for (int64_t j = begin; j < end; ++j) drow[j] = static_cast<scalar_t>(c * wp[j]);
        }
      }
    });
  });
  return {d_hidden, d_weight};
}

at::Tensor attribute_head_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& index) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "rmfast: hidden must be [N, D] and weight [A, D]");
  const int64_t D = hidden.size(1);
  const int64_t A = weight.size(0);
  const int64_t S = index.numel();
  at::Tensor out = at::empty({S, A}, weight.options());
  const at::Tensor idx = index.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t sn = hidden.stride(0);
  const int64_t sd = hidden.stride(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "attribute_head_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "rmfast: weight must be in the accumulation dtype");
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.const_data_ptr<acc_t>() : nullptr;
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(A * D, 1));
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* row = h + ip[s] * sn;
        for (int64_t a = 0; a < A; ++a) op[s * A + a] = dot_row(row, wp + a * D, D, sd) + (bp ? bp[a] : acc_t(0));
      }
    });
  });
  return out;
}

at::Tensor attribute_head_hidden_grad_cpu(const at::Tensor& like, const at::Tensor& weight, const at::Tensor& rows,
                                          const at::Tensor& coef) {
  TORCH_CHECK(like.dim() == 2 && weight.dim() == 2, "rmfast: like must be [N, D] and weight [A, D]");
  const int64_t N = like.size(0);
  const int64_t D = like.size(1);
  const int64_t A = weight.size(0);
  const int64_t M = rows.numel();
  at::Tensor d_hidden = zeros_2d(N, D, like.options());
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor coef_c = coef.contiguous();
  const at::Tensor w = weight.contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "attribute_head_hidden_grad_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value &&
                    coef.scalar_type() == weight.scalar_type(),
                "rmfast: weight and coef must be in the accumulation dtype");
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const int64_t* rp = rows_c.const_data_ptr<int64_t>();
    const acc_t* cp = coef_c.const_data_ptr<acc_t>();
    scalar_t* dh = d_hidden.mutable_data_ptr<scalar_t>();
    // Each task owns a block of columns of every listed row.
    const int64_t grain = std::max<int64_t>(64, 65536 / std::max<int64_t>(M * A, 1));
    at::parallel_for(0, D, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(end - begin);
      for (int64_t i = 0; i < M; ++i) {
        const int64_t row = rp[i];
        if (row < 0) continue;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t a = 0; a < A; ++a) {
          const acc_t c = cp[i * A + a];
          const acc_t* wa = wp + a * D + begin;
          acc_t* ap = acc.data();
_Pragma("omp simd")
          for (int64_t j = 0; j < end - begin; ++j) ap[j] += c * wa[j];
        }
        scalar_t* drow = dh + row * D + begin;
        for (int64_t j = 0; j < end - begin; ++j) drow[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return d_hidden;
}

}  // namespace rmfast
