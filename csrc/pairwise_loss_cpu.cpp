// CPU kernels of the fused pairwise reward loss: parallel over pairs (forward) and over hidden columns
// (backward) with at::parallel_for; inner loops are written for the compiler's vectoriser (omp simd).
#include "pairwise_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace rmfast {
namespace {

// The contiguous dot product keeps kLanes partial sums apart (several vector registers, independent chains,
// so the adds overlap) and adds them up at the end.
constexpr int64_t kLanes = 16;

template <typename scalar_t, typename acc_t>
inline acc_t dot_row(const scalar_t* row, const acc_t* w, int64_t D, int64_t stride_d) {
  acc_t acc = 0;
  if (stride_d == 1) {
    acc_t part[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= D; j += kLanes) {
_Pragma("omp simd")
      for (int64_t l = 0; l < kLanes; ++l) part[l] += static_cast<acc_t>(row[j + l]) * w[j + l];
    }
    for (; j < D; ++j) acc += static_cast<acc_t>(row[j]) * w[j];
    for (int64_t l = 0; l < kLanes; ++l) acc += part[l];
    return acc;
  }
  for (int64_t j = 0; j < D; ++j) acc += static_cast<acc_t>(row[j * stride_d]) * w[j];
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

// An uninitialised [N, D] tensor that is filled whole at once (the gathered rows). Large ones come from
// anonymous mmap in 2 MiB-aligned pieces marked for transparent huge pages, where the kernel allows them: one
// fault per 2 MiB instead of one per 4 KiB page, which is most of the cost of a fresh buffer of gathered rows
// (MAP_POPULATE of 4 KiB pages was measured too: no faster than faulting them in). Where THP is off the
// advice is ignored and the buffer is an ordinary mapping.
at::Tensor dense_2d(int64_t N, int64_t D, const at::TensorOptions& options) {
#ifdef __linux__
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(N) * static_cast<size_t>(D) * options.dtype().itemsize();
  if (bytes >= (size_t(1) << 20)) {
    const size_t span = (bytes + kHuge - 1) / kHuge * kHuge;
    const size_t mapped = span + kHuge;  // room to start on a 2 MiB boundary
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      // keep the aligned span only (one mapping per buffer), then ask for huge pages there
      const uintptr_t first = reinterpret_cast<uintptr_t>(base);
      const uintptr_t start = (first + kHuge - 1) / kHuge * kHuge;
      if (start > first) munmap(base, start - first);
      if (first + mapped > start + span) munmap(reinterpret_cast<void*>(start + span), first + mapped - start - span);
      void* data = reinterpret_cast<void*>(start);
      madvise(data, span, MADV_HUGEPAGE);  // advice only: ignored where THP is off
      return at::from_blob(data, {N, D}, [span](void* p) { munmap(p, span); }, options);
    }
  }
#endif
  return at::empty({N, D}, options);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_loss_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& chosen, const at::Tensor& rejected, const std::optional<at::Tensor>& margin,
    const std::optional<at::Tensor>& log_nu, const std::optional<at::Tensor>& tie) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const int64_t D = hidden.size(1);
  const int64_t P = chosen.numel();
  TORCH_CHECK(!tie.has_value() || (tie->scalar_type() == at::kBool && tie->numel() == P),
              "rmfast: tie must be a bool tensor [P]");
  TORCH_CHECK(!log_nu.has_value() || log_nu->numel() == 1, "rmfast: log_nu must hold one value");
  const auto acc_options = weight.options();
  at::Tensor rc = at::empty({P}, acc_options);
  at::Tensor rr = at::empty({P}, acc_options);
  at::Tensor loss = at::empty({P}, acc_options);
  const at::Tensor ci = chosen.contiguous();
  const at::Tensor ri = rejected.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor m = margin.has_value() ? margin->contiguous() : at::Tensor();
  const at::Tensor t = tie.has_value() ? tie->contiguous() : at::Tensor();
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
    const bool davidson = log_nu.has_value();
    const acc_t lnu = davidson ? log_nu->item<acc_t>() : acc_t(0);
    const bool* tp = t.defined() ? t.const_data_ptr<bool>() : nullptr;
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
        lp[p] = comparison_loss<acc_t>(diff, davidson, lnu, tp && tp[p]);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attribute_head_fwd_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& index,
    const std::optional<at::Tensor>& target, const std::optional<at::Tensor>& response_weight, bool gather) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2, "rmfast: hidden must be [N, D] and weight [A, D]");
  const int64_t D = hidden.size(1);
  const int64_t A = weight.size(0);
  const int64_t S = index.numel();
  check_attribute_target(target, response_weight, weight, S);
  at::Tensor out = at::empty({S, A}, weight.options());
  at::Tensor sums = at::empty({target.has_value() ? 2 : 0}, weight.options());
  at::Tensor rows = gather ? dense_2d(S, D, hidden.options()) : at::empty({0}, hidden.options());
  const at::Tensor t = target.has_value() ? target->contiguous() : at::Tensor();
  const at::Tensor rw = response_weight.has_value() ? response_weight->contiguous() : at::Tensor();
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
    // keyed on the target's presence, not its pointer: an empty target's is null, and its sums are still 0
    const bool has_target = t.defined();
    const acc_t* tp = has_target ? t.const_data_ptr<acc_t>() : nullptr;
    const acc_t* wsp = rw.defined() ? rw.const_data_ptr<acc_t>() : nullptr;
    std::vector<acc_t> row_sq(has_target ? S : 0), row_n(has_target ? S : 0);  // summed in order: deterministic
    scalar_t* rp = gather ? rows.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(A * D, 1));
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* row = h + ip[s] * sn;
        int64_t a = 0;
        if (rp) {  // the copy d_weight reads; the outputs then read it, in cache
          scalar_t* dst = rp + s * D;
          if (sd == 1) {
            std::memcpy(dst, row, D * sizeof(scalar_t));
          } else {
            for (int64_t j = 0; j < D; ++j) dst[j] = row[j * sd];
          }
          row = dst;
        }
        const int64_t stride = rp ? 1 : sd;
        for (; a < A; ++a) op[s * A + a] = dot_row(row, wp + a * D, D, stride) + (bp ? bp[a] : acc_t(0));
        if (has_target) {
          acc_t e = 0;
          acc_t n = 0;
          for (int64_t k = 0; k < A; ++k) {
            const acc_t y = tp[s * A + k];
            if (std::isfinite(y)) {
              const acc_t d = op[s * A + k] - y;
              e += d * d;
              n += 1;
            }
          }
          const acc_t ws = wsp ? wsp[s] : acc_t(1);
          row_sq[s] = ws * e;
          row_n[s] = ws * n;
        }
      }
    });
    if (has_target) {
      acc_t e = 0;
      acc_t n = 0;
      for (int64_t s = 0; s < S; ++s) {
        e += row_sq[s];
        n += row_n[s];
      }
      acc_t* sp = sums.mutable_data_ptr<acc_t>();
      sp[0] = e;
      sp[1] = n;
    }
  });
  return {out, sums, rows};
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

at::Tensor gather_rows_cpu(const at::Tensor& hidden, const at::Tensor& index) {
  TORCH_CHECK(hidden.dim() == 2, "rmfast: hidden must be 2-D [N, D]");
  const int64_t D = hidden.size(1);
  const int64_t S = index.numel();
  at::Tensor rows = dense_2d(S, D, hidden.options());
  const at::Tensor idx = index.contiguous();
  const int64_t sn = hidden.stride(0);
  const int64_t sd = hidden.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_rows_cpu", [&] {
    const scalar_t* h = hidden.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* rp = rows.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const scalar_t* row = h + ip[s] * sn;
        scalar_t* dst = rp + s * D;
        if (sd == 1) {
          std::memcpy(dst, row, D * sizeof(scalar_t));
        } else {
          for (int64_t j = 0; j < D; ++j) dst[j] = row[j * sd];
        }
      }
    });
  });
  return rows;
}

std::tuple<at::Tensor, at::Tensor> plackett_luce_fwd_cpu(const at::Tensor& rewards, const at::Tensor& group,
                                                         const at::Tensor& scores, const at::Tensor& weight) {
  check_plackett_luce(rewards, group, scores, weight);
  const int64_t S = rewards.numel();
  at::Tensor loss = at::empty({}, rewards.options());
  at::Tensor coef = at::empty({S}, rewards.options());
  const at::Tensor r_c = rewards.contiguous();
  const at::Tensor g_c = group.contiguous();
  const at::Tensor s_c = scores.contiguous();
  const at::Tensor w_c = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "plackett_luce_fwd_cpu", [&] {
    const scalar_t* r = r_c.const_data_ptr<scalar_t>();
    const int64_t* g = g_c.const_data_ptr<int64_t>();
    const scalar_t* sc = s_c.const_data_ptr<scalar_t>();
    const scalar_t* w = w_c.const_data_ptr<scalar_t>();
    scalar_t* cp = coef.mutable_data_ptr<scalar_t>();
    std::vector<scalar_t> lse(S), term(S);
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(S, 1));
    // each response's log-sum-exp over its risk set (its maximum first: stable at any reward; NaN carried)
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        scalar_t top = r[k];
        for (int64_t j = 0; j < S; ++j)
          if (g[j] == g[k] && sc[j] <= sc[k] && r[j] > top) top = r[j];
        scalar_t sum = 0;
        for (int64_t j = 0; j < S; ++j)
          if (g[j] == g[k] && sc[j] <= sc[k]) sum += std::exp(r[j] - top);
        lse[k] = top + std::log(sum);
        term[k] = w[k] * (lse[k] - r[k]);
      }
    });
    // dloss/dr_j: every set j is in, softmax-weighted, less its own weight
    at::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        scalar_t acc = 0;
        for (int64_t k = 0; k < S; ++k)
          if (g[k] == g[j] && sc[j] <= sc[k]) acc += w[k] * std::exp(r[j] - lse[k]);
        cp[j] = acc - w[j];
      }
    });
    scalar_t total = 0;
    for (int64_t k = 0; k < S; ++k) total += term[k];  // in order: deterministic
    loss.fill_(total);
  });
  return {loss, coef};
}

}  // namespace rmfast
