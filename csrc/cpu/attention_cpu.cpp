// CPU kernels of conditional cross-attention:
//   out = softmax(scale (q_c k_c^T + q_p k_p^T) + mask) v   per batch element and head.
//
// The forward pass walks blocks of queries against blocks of keys with an online softmax, so
// the [queries, keys] matrix only ever exists one cache-sized tile at a time; the backward
// pass recomputes those tiles from the saved log-sum-exp. Tile products go through ATen's
// matmul (MKL where torch has it) reading the sequence-first inputs in place through
// their row strides; the softmax passes use an exp that the compiler vectorizes.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 256;

// Row loops below are compiled once per instruction set and picked at load time, because the
// extension is built for a generic x86-64 target but the gain here comes from wide vectors.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__APPLE__)
#define CDETR_VECTOR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define CDETR_VECTOR_CLONES
#endif

// Row-major C[m x n] = alpha op(A) op(B) + beta C on raw tiles. The products go through ATen's
// matmul on strided views (MKL where torch has it): cpublas's own entry points are not exported
// to extensions, and a few microseconds of dispatch per tile are small against its work.
template <typename acc_t>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
             const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c,
             int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto view = [&](const acc_t* data, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    // op(X) is rows x cols; X itself is stored row-major with leading dimension ld
    return trans ? at::from_blob(const_cast<acc_t*>(data), {rows, cols}, {1, ld}, options)
                 : at::from_blob(const_cast<acc_t*>(data), {rows, cols}, {ld, 1}, options);
  };
  auto out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  out.addmm_(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b), beta, alpha);
}

// e^x with |relative error| ~ 2 ulp, 0 below -87 (so -inf gives 0); written as straight-line
// arithmetic so that loops over it vectorize.
inline float exp_approx(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline double exp_approx(double x) { return std::exp(x); }

constexpr int kLanes = 16;

// Sets masked keys to -inf and returns the row maximum.
template <typename acc_t>
acc_t mask_and_max(acc_t* row, const bool* mask, int64_t n) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t best = neg_inf;
  for (int64_t j = 0; j < n; ++j) {
    if (mask && mask[j]) row[j] = neg_inf;
    best = std::max(best, row[j]);
  }
  return best;
}

CDETR_VECTOR_CLONES
float mask_and_max(float* row, const bool* mask, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (mask) {
    for (int64_t j = 0; j < n; ++j) row[j] = mask[j] ? neg_inf : row[j];
  }
  float lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = neg_inf;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = row[j + l] > lanes[l] ? row[j + l] : lanes[l];
  }
  float best = neg_inf;
  for (; j < n; ++j) best = row[j] > best ? row[j] : best;
  for (int l = 0; l < kLanes; ++l) best = lanes[l] > best ? lanes[l] : best;
  return best;
}

// row = exp(row - shift); returns the sum.
template <typename acc_t>
acc_t exp_and_sum(acc_t* row, int64_t n, acc_t shift) {
  acc_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    row[j] = exp_approx(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

CDETR_VECTOR_CLONES
float exp_and_sum(float* row, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_approx(row[j + l] - shift);
      row[j + l] = e;
      lanes[l] += e;
    }
  }
  float sum = 0.f;
  for (; j < n; ++j) {
    row[j] = exp_approx(row[j] - shift);
    sum += row[j];
  }
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// row = exp(row - shift) with masked keys at 0 (backward: shift is the log-sum-exp).
template <typename acc_t>
void masked_exp(acc_t* row, const bool* mask, int64_t n, acc_t shift) {
  for (int64_t j = 0; j < n; ++j) {
    row[j] = (mask && mask[j]) ? acc_t(0) : exp_approx(row[j] - shift);
  }
}

CDETR_VECTOR_CLONES
void masked_exp(float* row, const bool* mask, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - shift);
  if (mask) {
    for (int64_t j = 0; j < n; ++j) row[j] = mask[j] ? 0.f : row[j];
  }
}

// dS = P (dP - D) in place of dP.
template <typename acc_t>
void softmax_grad(const acc_t* p, acc_t* dp, int64_t n, acc_t d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

CDETR_VECTOR_CLONES
void softmax_grad(const float* p, float* dp, int64_t n, float d) {
  for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
}

// Multiplies row[j] by keep_scale or 0 according to the dropout hash of element first + j.
template <typename acc_t>
void apply_dropout(acc_t* row, int64_t n, const DropoutParams& dropout, uint64_t first) {
  const acc_t keep_scale = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout_hash(dropout.seed, first + j) >= dropout.threshold;
    row[j] = keep ? row[j] * keep_scale : acc_t(0);
  }
}

// Strided rows of a [length, batch, channels] input, seen as a row-major matrix.
template <typename scalar_t>
struct RowView {
  const scalar_t* data;
  int64_t ld;
};

// The rows [first, first + count) of `view` as acc_t: in place when the types agree,
// otherwise converted into `buffer` (contiguous, ld = cols).
template <typename scalar_t, typename acc_t>
RowView<acc_t> rows_as_acc(RowView<scalar_t> view, int64_t first, int64_t count, int64_t cols,
                           std::vector<acc_t>& buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return {view.data + first * view.ld, view.ld};
  } else {
    buffer.resize(count * cols);
    for (int64_t r = 0; r < count; ++r) {
      const scalar_t* src = view.data + (first + r) * view.ld;
      for (int64_t c = 0; c < cols; ++c) buffer[r * cols + c] = static_cast<acc_t>(src[c]);
    }
    return {buffer.data(), cols};
  }
}

struct Inputs {
  at::Tensor q_content, q_spatial, k_content, k_spatial, value;
};

// Channels must be contiguous; sequence and batch strides are read as they are.
at::Tensor unit_channel_stride(const at::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}

template <typename scalar_t>
RowView<scalar_t> head_rows(const at::Tensor& t, int64_t b, int64_t h, int64_t head_channels) {
  return {t.const_data_ptr<scalar_t>() + b * t.stride(1) + h * head_channels, t.stride(0)};
}

template <typename scalar_t>
void forward_kernel(const Inputs& in, const bool* mask, const AttentionShape& s,
                    const DropoutParams& dropout, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = s.num_queries, K = s.num_keys, H = s.num_heads;
  const int64_t hd = s.head_dim, vd = s.value_head_dim;
  const int64_t query_blocks = (Q + kQueryBlock - 1) / kQueryBlock;
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(2.0 * static_cast<double>(hd)));
  scalar_t* out_data = out.data_ptr<scalar_t>();
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const int64_t out_ld = out.stride(0);

  at::parallel_for(0, s.batch * H * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * vd);
    std::vector<acc_t> row_max(kQueryBlock), row_sum(kQueryBlock);
    std::vector<acc_t> qc_buf, qs_buf, kc_buf, ks_buf, v_buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % query_blocks, bh = task / query_blocks;
      const int64_t b = bh / H, h = bh % H;
      const int64_t q0 = qb * kQueryBlock, nq = std::min(kQueryBlock, Q - q0);
      const auto qc = rows_as_acc(head_rows<scalar_t>(in.q_content, b, h, hd), q0, nq, hd, qc_buf);
      const auto qs = rows_as_acc(head_rows<scalar_t>(in.q_spatial, b, h, hd), q0, nq, hd, qs_buf);
      const bool* mask_b = mask ? mask + b * K : nullptr;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      for (int64_t k0 = 0; k0 < K; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, K - k0);
        const auto kc = rows_as_acc(head_rows<scalar_t>(in.k_content, b, h, hd), k0, nk, hd, kc_buf);
        const auto ks = rows_as_acc(head_rows<scalar_t>(in.k_spatial, b, h, hd), k0, nk, hd, ks_buf);
        const auto v = rows_as_acc(head_rows<scalar_t>(in.value, b, h, vd), k0, nk, vd, v_buf);
        // scores[nq x nk] (ld kKeyBlock) = scale (q_c k_c^T + q_p k_p^T)
        gemm_rm<acc_t>(false, true, nq, nk, hd, scale, qc.data, qc.ld, kc.data, kc.ld, 0,
                       scores.data(), kKeyBlock);
        gemm_rm<acc_t>(false, true, nq, nk, hd, scale, qs.data, qs.ld, ks.data, ks.ld, 1,
                       scores.data(), kKeyBlock);
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = scores.data() + i * kKeyBlock;
          const acc_t block_max = mask_and_max(row, mask_b ? mask_b + k0 : nullptr, nk);
          const acc_t new_max = std::max(row_max[i], block_max);
          if (new_max == -std::numeric_limits<acc_t>::infinity()) {
            // every key so far is padding: nothing to add yet
            std::fill(row, row + nk, acc_t(0));
            continue;
          }
          const acc_t correction = exp_approx(row_max[i] - new_max);
          row_sum[i] = row_sum[i] * correction + exp_and_sum(row, nk, new_max);
          row_max[i] = new_max;
          if (correction != acc_t(1)) {
            acc_t* o = acc.data() + i * vd;
            for (int64_t c = 0; c < vd; ++c) o[c] *= correction;
          }
          if (dropout.enabled) {
            apply_dropout(row, nk, dropout, ((bh * Q) + q0 + i) * K + k0);
          }
        }
        // acc[nq x vd] += P v
        gemm_rm<acc_t>(false, false, nq, vd, nk, 1, scores.data(), kKeyBlock, v.data, v.ld, 1,
                       acc.data(), vd);
      }

      for (int64_t i = 0; i < nq; ++i) {
        scalar_t* o = out_data + (q0 + i) * out_ld + b * out.stride(1) + h * vd;
        const bool empty = row_sum[i] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / row_sum[i];
        for (int64_t c = 0; c < vd; ++c) o[c] = static_cast<scalar_t>(acc[i * vd + c] * inv);
        // +inf makes exp(score - lse) vanish in the backward pass for rows with no key
        lse_data[bh * Q + q0 + i] =
            empty ? std::numeric_limits<acc_t>::infinity() : row_max[i] + std::log(row_sum[i]);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Inputs& in, const bool* mask, const AttentionShape& s,
                     const DropoutParams& dropout, const at::Tensor& grad_out,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor grads[5]) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = s.num_queries, K = s.num_keys, H = s.num_heads;
  const int64_t hd = s.head_dim, vd = s.value_head_dim;
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(2.0 * static_cast<double>(hd)));
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();

  // Each task owns one (batch, head): its slices of every gradient are disjoint from the
  // others', so no reduction across threads is needed.
  at::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> probs(kQueryBlock * kKeyBlock), dprobs(kQueryBlock * kKeyBlock);
    std::vector<acc_t> dropped(dropout.enabled ? kQueryBlock * kKeyBlock : 0);
    std::vector<acc_t> dkc(K * hd), dks(K * hd), dv(K * vd);
    std::vector<acc_t> dqc(kQueryBlock * hd), dqs(kQueryBlock * hd), delta(kQueryBlock);
    std::vector<acc_t> qc_buf, qs_buf, do_buf, o_buf, kc_buf, ks_buf, v_buf;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const bool* mask_b = mask ? mask + b * K : nullptr;
      std::fill(dkc.begin(), dkc.end(), acc_t(0));
      std::fill(dks.begin(), dks.end(), acc_t(0));
      std::fill(dv.begin(), dv.end(), acc_t(0));
      for (int64_t q0 = 0; q0 < Q; q0 += kQueryBlock) {
        const int64_t nq = std::min(kQueryBlock, Q - q0);
        const auto qc = rows_as_acc(head_rows<scalar_t>(in.q_content, b, h, hd), q0, nq, hd, qc_buf);
        const auto qs = rows_as_acc(head_rows<scalar_t>(in.q_spatial, b, h, hd), q0, nq, hd, qs_buf);
        const auto dout = rows_as_acc(head_rows<scalar_t>(grad_out, b, h, vd), q0, nq, vd, do_buf);
        const auto o = rows_as_acc(head_rows<scalar_t>(out, b, h, vd), q0, nq, vd, o_buf);
        // delta_i = dO_i . O_i, the softmax-gradient correction (dropout included)
        for (int64_t i = 0; i < nq; ++i) {
          acc_t d = 0;
          for (int64_t c = 0; c < vd; ++c) d += dout.data[i * dout.ld + c] * o.data[i * o.ld + c];
          delta[i] = d;
        }
        std::fill(dqc.begin(), dqc.end(), acc_t(0));
        std::fill(dqs.begin(), dqs.end(), acc_t(0));
        for (int64_t k0 = 0; k0 < K; k0 += kKeyBlock) {
          const int64_t nk = std::min(kKeyBlock, K - k0);
          const auto kc = rows_as_acc(head_rows<scalar_t>(in.k_content, b, h, hd), k0, nk, hd, kc_buf);
          const auto ks = rows_as_acc(head_rows<scalar_t>(in.k_spatial, b, h, hd), k0, nk, hd, ks_buf);
          const auto v = rows_as_acc(head_rows<scalar_t>(in.value, b, h, vd), k0, nk, vd, v_buf);
          gemm_rm<acc_t>(false, true, nq, nk, hd, scale, qc.data, qc.ld, kc.data, kc.ld, 0,
                         probs.data(), kKeyBlock);
          gemm_rm<acc_t>(false, true, nq, nk, hd, scale, qs.data, qs.ld, ks.data, ks.ld, 1,
                         probs.data(), kKeyBlock);
          // dP = dO v^T
          gemm_rm<acc_t>(false, true, nq, nk, vd, 1, dout.data, dout.ld, v.data, v.ld, 0,
                         dprobs.data(), kKeyBlock);
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* p = probs.data() + i * kKeyBlock;
            acc_t* dp = dprobs.data() + i * kKeyBlock;
            masked_exp(p, mask_b ? mask_b + k0 : nullptr, nk, lse_data[bh * Q + q0 + i]);
            if (dropout.enabled) {
              const uint64_t first = ((bh * Q) + q0 + i) * K + k0;
              acc_t* pd = dropped.data() + i * kKeyBlock;
              std::copy(p, p + nk, pd);
              apply_dropout(pd, nk, dropout, first);
              apply_dropout(dp, nk, dropout, first);
            }
            softmax_grad(p, dp, nk, delta[i]);
          }
          const acc_t* p_used = dropout.enabled ? dropped.data() : probs.data();
          // dv += P_dropped^T dO ; dq += scale dS k ; dk += scale dS^T q
          gemm_rm<acc_t>(true, false, nk, vd, nq, 1, p_used, kKeyBlock, dout.data, dout.ld, 1,
                         dv.data() + k0 * vd, vd);
          gemm_rm<acc_t>(false, false, nq, hd, nk, scale, dprobs.data(), kKeyBlock, kc.data, kc.ld,
                         1, dqc.data(), hd);
          gemm_rm<acc_t>(false, false, nq, hd, nk, scale, dprobs.data(), kKeyBlock, ks.data, ks.ld,
                         1, dqs.data(), hd);
          gemm_rm<acc_t>(true, false, nk, hd, nq, scale, dprobs.data(), kKeyBlock, qc.data, qc.ld,
                         1, dkc.data() + k0 * hd, hd);
          gemm_rm<acc_t>(true, false, nk, hd, nq, scale, dprobs.data(), kKeyBlock, qs.data, qs.ld,
                         1, dks.data() + k0 * hd, hd);
        }
        for (int64_t i = 0; i < nq; ++i) {
          for (int part = 0; part < 2; ++part) {
            at::Tensor& g = grads[part];
            scalar_t* dst = g.data_ptr<scalar_t>() + (q0 + i) * g.stride(0) + b * g.stride(1) + h * hd;
            const acc_t* src = (part == 0 ? dqc : dqs).data() + i * hd;
            for (int64_t c = 0; c < hd; ++c) dst[c] = static_cast<scalar_t>(src[c]);
          }
        }
      }
      for (int64_t j = 0; j < K; ++j) {
        for (int part = 2; part < 5; ++part) {
          at::Tensor& g = grads[part];
          const int64_t width = part == 4 ? vd : hd;
          scalar_t* dst = g.data_ptr<scalar_t>() + j * g.stride(0) + b * g.stride(1) + h * width;
          const acc_t* src = (part == 2 ? dkc : part == 3 ? dks : dv).data() + j * width;
          for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(src[c]);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q_content, const at::Tensor& q_spatial, const at::Tensor& k_content,
    const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, int64_t num_heads, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const auto shape = check_attention_inputs(q_content, q_spatial, k_content, k_spatial, value,
                                            key_padding_mask, num_heads);
  TORCH_CHECK(q_content.device().is_cpu(), "attention_forward_cpu: expected CPU tensors");
  const auto dropout = make_dropout_params(dropout_p, rng_state);
  const Inputs in{unit_channel_stride(q_content), unit_channel_stride(q_spatial),
                  unit_channel_stride(k_content), unit_channel_stride(k_spatial),
                  unit_channel_stride(value)};
  const auto dtype = q_content.scalar_type();
  const auto lse_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto out = at::empty({shape.num_queries, shape.batch, value.size(2)}, q_content.options());
  auto lse = at::empty({shape.batch, num_heads, shape.num_queries},
                       q_content.options().dtype(lse_dtype));
  if (out.numel() == 0) {
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_forward_cpu", [&] {
    forward_kernel<scalar_t>(in, mask_data, shape, dropout, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_spatial,
    const at::Tensor& k_content, const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_heads, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const auto shape = check_attention_inputs(q_content, q_spatial, k_content, k_spatial, value,
                                            key_padding_mask, num_heads);
  TORCH_CHECK(q_content.device().is_cpu(), "attention_backward_cpu: expected CPU tensors");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == shape.num_queries &&
                  out.size(1) == shape.batch && out.size(2) == value.size(2),
              "attention_backward_cpu: grad_out ", grad_out.sizes(), " and out ", out.sizes(),
              " must be [num_queries, batch, value channels]");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == shape.batch && lse.size(1) == num_heads &&
                  lse.size(2) == shape.num_queries,
              "attention_backward_cpu: lse must be [batch, heads, queries], got ", lse.sizes());
  const auto dropout = make_dropout_params(dropout_p, rng_state);
  const auto dtype = q_content.scalar_type();
  const auto lse_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const Inputs in{unit_channel_stride(q_content), unit_channel_stride(q_spatial),
                  unit_channel_stride(k_content), unit_channel_stride(k_spatial),
                  unit_channel_stride(value)};
  at::Tensor grads[5] = {
      at::empty(q_content.sizes(), q_content.options()), at::empty(q_spatial.sizes(), q_spatial.options()),
      at::empty(k_content.sizes(), k_content.options()), at::empty(k_spatial.sizes(), k_spatial.options()),
      at::empty(value.sizes(), value.options())};
  if (out.numel() == 0 || shape.num_keys == 0) {
    for (auto& g : grads) g.zero_();
    return {grads[0], grads[1], grads[2], grads[3], grads[4]};
  }
  const auto grad_c = unit_channel_stride(grad_out.to(dtype));
  const auto out_c = unit_channel_stride(out);
  const auto lse_c = lse.to(lse_dtype).contiguous();
  const auto mask = key_padding_mask.has_value() ? key_padding_mask->contiguous() : at::Tensor();
  const bool* mask_data = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(in, mask_data, shape, dropout, grad_c, out_c, lse_c, grads);
  });
  return {grads[0], grads[1], grads[2], grads[3], grads[4]};
}

TORCH_LIBRARY_IMPL(conditional_detr, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace conditional_detr
