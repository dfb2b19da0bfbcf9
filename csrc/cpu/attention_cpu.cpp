// CPU kernels of conditional cross-attention:
//   out = softmax(scale (q_c k_c^T + q_p k_p^T) + mask) v   per batch element and head.
//
// The forward pass walks blocks of queries against blocks of keys with an online softmax, so
// the [queries, keys] matrix only ever exists one cache-sized tile at a time; the backward
// pass recomputes those tiles from the saved log-sum-exp. Tiles are packed into per-thread
// buffers (which also widens fp16/bf16 to fp32) and multiplied by small register-blocked
// loops; those and the softmax passes (with an exp written to vectorize) are compiled per
// instruction set level.
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
#include "vector.h"

namespace conditional_detr {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 256;

// Row loops below are compiled once per instruction set level (vector.h): the gain here
// comes from wide vectors.

// Register block of the tile products: kRows rows x kVecs vectors of C, accumulated in
// registers across the whole reduction (6 x 2 vectors: 12 accumulators, 2 rows of B and a
// broadcast fill AVX2's 16 registers).
constexpr int kRows = 6;

template <typename T, int kBlockRows, int kVecs, int kBytes>
CDETR_ALWAYS_INLINE void gemm_block(int64_t m0, int64_t n0, int64_t depth, T alpha, const T* a,
                                    int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                                    int64_t ldc) {
  using V = typename Vec<T, kBytes>::type;
  constexpr int kLanes = Vec<T, kBytes>::kLanes;
  V acc[kBlockRows][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < kBlockRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V{};
  }
  for (int64_t l = 0; l < depth; ++l) {
    V b_vecs[kVecs];
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) load_vec(b_vecs[v], b + l * ldb + n0 + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < kBlockRows; ++r) {
      const T a_rl = a[(m0 + r) * lda + l];
#pragma GCC unroll 8
      for (int v = 0; v < kVecs; ++v) acc[r][v] += a_rl * b_vecs[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kBlockRows; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      T* dst = c + (m0 + r) * ldc + n0 + v * kLanes;
      V result = alpha * acc[r][v];
      if (beta != T(0)) {
        V old;
        load_vec(old, dst);
        result += beta * old;
      }
      std::memcpy(dst, &result, sizeof(V));
    }
  }
}

// Leftover rows or columns of C, one element at a time.
template <typename T>
CDETR_ALWAYS_INLINE void gemm_edge(int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t depth,
                                   T alpha, const T* a, int64_t lda, const T* b, int64_t ldb,
                                   T beta, T* c, int64_t ldc) {
  for (int64_t i = m0; i < m1; ++i) {
    for (int64_t j = n0; j < n1; ++j) {
      T sum = 0;
      for (int64_t l = 0; l < depth; ++l) sum += a[i * lda + l] * b[l * ldb + j];
      c[i * ldc + j] = (beta == T(0) ? T(0) : beta * c[i * ldc + j]) + alpha * sum;
    }
  }
}

template <typename T, int kBytes>
CDETR_ALWAYS_INLINE void gemm_body(int64_t m, int64_t n, int64_t depth, T alpha, const T* a,
                                   int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                                   int64_t ldc) {
  constexpr int kLanes = Vec<T, kBytes>::kLanes;
  int64_t n0 = 0;
  for (; n0 + 2 * kLanes <= n; n0 += 2 * kLanes) {
    int64_t m0 = 0;
    for (; m0 + kRows <= m; m0 += kRows) {
      gemm_block<T, kRows, 2, kBytes>(m0, n0, depth, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    for (; m0 < m; ++m0) gemm_block<T, 1, 2, kBytes>(m0, n0, depth, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  for (; n0 + kLanes <= n; n0 += kLanes) {
    int64_t m0 = 0;
    for (; m0 + kRows <= m; m0 += kRows) {
      gemm_block<T, kRows, 1, kBytes>(m0, n0, depth, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    for (; m0 < m; ++m0) gemm_block<T, 1, 1, kBytes>(m0, n0, depth, alpha, a, lda, b, ldb, beta, c, ldc);
  }
  gemm_edge<T>(0, m, n0, n, depth, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major C[m x n] = alpha A B + beta C for the small tiles of this kernel, with the rows of
// A and of B contiguous (callers pack or transpose operands first). Written here rather than
// calling BLAS: ATen's cpublas entry points are not exported to extensions, and calling a
// threaded BLAS from inside at::parallel_for lets its thread pool fight ours. There is no
// transposed-A variant on purpose: GCC 12's loop vectorizer turns the column reads of such a
// loop into loads that run past the end of A.
// Baseline x86-64 gets 16-byte vectors: with 32-byte ones GCC builds each broadcast of A in
// memory, half a vector at a time, and the loads that follow stall (ten times slower).
CDETR_LEVEL_DISPATCH(, void, gemm_tile, (gemm_body<float, 32>), (gemm_body<float, 16>),
                     (int64_t m, int64_t n, int64_t depth, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc),
                     (m, n, depth, alpha, a, lda, b, ldb, beta, c, ldc))

void gemm_tile(int64_t m, int64_t n, int64_t depth, double alpha, const double* a, int64_t lda,
               const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_body<double, 32>(m, n, depth, alpha, a, lda, b, ldb, beta, c, ldc);
}

// dst[c][r] = src[r][c] for a rows x cols tile.
template <typename T>
void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t ld_src, T* dst,
                    int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

// e^x with |relative error| ~ 2 ulp, 0 below -87 (so -inf gives 0); written as straight-line
// arithmetic so that loops over it vectorize.
CDETR_ALWAYS_INLINE float exp_approx(float x) {
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

// Adds the keys' bias (0, or -inf for padding) and returns the row maximum.
template <typename acc_t>
acc_t mask_and_max(acc_t* row, const acc_t* key_bias, int64_t n) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    if (key_bias) row[j] += key_bias[j];
    best = std::max(best, row[j]);
  }
  return best;
}

CDETR_ALWAYS_INLINE float mask_and_max_vectors(float* row, const float* key_bias, int64_t n) {
  using V = Vec32<float>::type;
  constexpr int kWidth = Vec32<float>::kLanes;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (key_bias) {
    for (int64_t j = 0; j < n; ++j) row[j] += key_bias[j];
  }
  V lanes = V{} + neg_inf;
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) {
    V x;
    load_vec(x, row + j);
    lanes = x > lanes ? x : lanes;
  }
  float best = neg_inf;
  for (; j < n; ++j) best = row[j] > best ? row[j] : best;
  for (int l = 0; l < kWidth; ++l) best = lanes[l] > best ? lanes[l] : best;
  return best;
}

CDETR_VECTOR_LEVELS(float, mask_and_max, mask_and_max_vectors,
                    (float* row, const float* key_bias, int64_t n), (row, key_bias, n))

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

CDETR_ALWAYS_INLINE float exp_and_sum_lanes(float* row, int64_t n, float shift) {
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

CDETR_VECTOR_LEVELS(float, exp_and_sum, exp_and_sum_lanes, (float* row, int64_t n, float shift),
                    (row, n, shift))

// Backward, one key's row of a transposed tile: row[i] = exp(row[i] - lse[i]) over queries i.
template <typename acc_t>
CDETR_ALWAYS_INLINE void exp_minus_lse(acc_t* row, const acc_t* lse, int64_t n) {
  for (int64_t i = 0; i < n; ++i) row[i] = exp_approx(row[i] - lse[i]);
}

CDETR_VECTOR_LEVELS(void, exp_minus_lse, exp_minus_lse<float>,
                    (float* row, const float* lse, int64_t n), (row, lse, n))

// dS = P (dP - D) in place of dP, along one key's row of a transposed tile.
template <typename acc_t>
CDETR_ALWAYS_INLINE void softmax_grad(const acc_t* p, acc_t* dp, const acc_t* delta, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - delta[i]);
}

CDETR_VECTOR_LEVELS(void, softmax_grad, softmax_grad<float>,
                    (const float* p, float* dp, const float* delta, int64_t n), (p, dp, delta, n))

// Multiplies row[j] by keep_scale or 0 according to the dropout hash of element
// first + j * stride (stride K walks a query column of the [queries, keys] matrix).
template <typename acc_t>
CDETR_ALWAYS_INLINE void apply_dropout(acc_t* row, int64_t n, const DropoutParams& dropout,
                                       uint64_t first, uint64_t stride = 1) {
  const acc_t keep_scale = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t j = 0; j < n; ++j) {
    const bool keep = dropout_hash(dropout.seed, first + j * stride) >= dropout.threshold;
    row[j] = keep ? row[j] * keep_scale : acc_t(0);
  }
}

// The hash's 64-bit multiplies vectorize with AVX-512 (the x86-64-v4 build is several times
// faster than the baseline loop).
CDETR_VECTOR_LEVELS(void, apply_dropout, apply_dropout<float>,
                    (float* row, int64_t n, const DropoutParams& dropout, uint64_t first,
                     uint64_t stride = 1),
                    (row, n, dropout, first, stride))

struct Inputs {
  at::Tensor q_content, q_spatial, k_content, k_spatial, value;
};

// Channels must be contiguous; sequence and batch strides are read as they are.
at::Tensor unit_channel_stride(const at::Tensor& t) {
  return t.stride(2) == 1 ? t : t.contiguous();
}

// One head's slice of a [length, batch, channels] tensor: row r starts at data + r * ld.
template <typename scalar_t>
struct HeadRows {
  const scalar_t* data;
  int64_t ld;
};

template <typename scalar_t>
HeadRows<scalar_t> head_rows(const at::Tensor& t, int64_t b, int64_t h, int64_t head_channels) {
  return {t.const_data_ptr<scalar_t>() + b * t.stride(1) + h * head_channels, t.stride(0)};
}

// dst[r][offset + c] = rows[first + r][c] for r < count, c < cols (row-major, leading dim ld).
template <typename scalar_t, typename acc_t>
void pack_rows(HeadRows<scalar_t> src, int64_t first, int64_t count, int64_t cols, acc_t* dst,
               int64_t ld, int64_t offset) {
  for (int64_t r = 0; r < count; ++r) {
    const scalar_t* row = src.data + (first + r) * src.ld;
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + offset + c] = static_cast<acc_t>(row[c]);
  }
}

// Keys after a batch element's last unpadded key take no attention and get no gradient:
// both passes stop there (images padded at the bottom pad a tail of the keys).
std::vector<int64_t> unpadded_key_counts(const bool* mask, int64_t batch, int64_t num_keys) {
  std::vector<int64_t> counts(batch, num_keys);
  for (int64_t b = 0; mask && b < batch; ++b) {
    while (counts[b] > 0 && mask[b * num_keys + counts[b] - 1]) --counts[b];
  }
  return counts;
}

template <typename scalar_t>
void forward_kernel(const Inputs& in, const bool* mask, const AttentionShape& s,
                    const DropoutParams& dropout, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = s.num_queries, K = s.num_keys, H = s.num_heads;
  const int64_t hd = s.head_dim, vd = s.value_head_dim, qk = 2 * hd;
  const int64_t query_blocks = (Q + kQueryBlock - 1) / kQueryBlock;
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(2.0 * static_cast<double>(hd)));
  scalar_t* out_data = out.data_ptr<scalar_t>();
  acc_t* lse_data = lse.data_ptr<acc_t>();

  const auto key_counts = unpadded_key_counts(mask, s.batch, K);

  // tasks run head-major, so that each thread gets a mix of batch elements (whose unpadded
  // lengths differ) and consecutive tasks share a (batch, head)
  at::parallel_for(0, s.batch * H * query_blocks, 1, [&](int64_t begin, int64_t end) {
    // queries as [q_c | q_p] rows, keys transposed to [k_c | k_p] columns: one product of
    // depth 2 * head_dim gives the summed content and spatial logits. A thread's tasks are
    // consecutive, so it packs the keys and values of a (batch, head) once for all of its
    // query blocks.
    std::vector<acc_t> queries(kQueryBlock * qk), keys(K * qk), keys_t(qk * K), values(K * vd);
    // the padding mask as an additive bias, 0 or -inf per key, which vectorizes
    std::vector<acc_t> key_bias(mask ? K : 0);
    std::vector<acc_t> scores(kQueryBlock * kKeyBlock), acc(kQueryBlock * vd);
    std::vector<acc_t> row_max(kQueryBlock), row_sum(kQueryBlock);
    int64_t packed_bh = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % query_blocks, pair = task / query_blocks;
      const int64_t h = pair / s.batch, b = pair % s.batch, bh = b * H + h, Kb = key_counts[b];
      const int64_t q0 = qb * kQueryBlock, nq = std::min(kQueryBlock, Q - q0);
      if (bh != packed_bh) {
        pack_rows(head_rows<scalar_t>(in.k_content, b, h, hd), 0, Kb, hd, keys.data(), qk, 0);
        pack_rows(head_rows<scalar_t>(in.k_spatial, b, h, hd), 0, Kb, hd, keys.data(), qk, hd);
        transpose_tile(keys.data(), Kb, qk, qk, keys_t.data(), K);
        pack_rows(head_rows<scalar_t>(in.value, b, h, vd), 0, Kb, vd, values.data(), vd, 0);
        for (int64_t j = 0; j < static_cast<int64_t>(key_bias.size()); ++j) {
          key_bias[j] = mask[b * K + j] ? -std::numeric_limits<acc_t>::infinity() : acc_t(0);
        }
        packed_bh = bh;
      }
      pack_rows(head_rows<scalar_t>(in.q_content, b, h, hd), q0, nq, hd, queries.data(), qk, 0);
      pack_rows(head_rows<scalar_t>(in.q_spatial, b, h, hd), q0, nq, hd, queries.data(), qk, hd);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      for (int64_t k0 = 0; k0 < Kb; k0 += kKeyBlock) {
        const int64_t nk = std::min(kKeyBlock, Kb - k0);
        gemm_tile(nq, nk, qk, scale, queries.data(), qk, keys_t.data() + k0, K, acc_t(0),
                  scores.data(), kKeyBlock);
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = scores.data() + i * kKeyBlock;
          const acc_t block_max = mask_and_max(row, mask ? key_bias.data() + k0 : nullptr, nk);
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
        gemm_tile(nq, vd, nk, acc_t(1), scores.data(), kKeyBlock, values.data() + k0 * vd, vd,
                  acc_t(1), acc.data(), vd);
      }

      for (int64_t i = 0; i < nq; ++i) {
        scalar_t* o = out_data + (q0 + i) * out.stride(0) + b * out.stride(1) + h * vd;
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

// Writes rows [first, first + count) of one head's slice of a [length, batch, channels]
// gradient from a packed [count x cols] buffer (leading dim ld, column offset).
template <typename scalar_t, typename acc_t>
void unpack_rows(const acc_t* src, int64_t ld, int64_t offset, int64_t first, int64_t count,
                 int64_t cols, at::Tensor& dst, int64_t b, int64_t h) {
  scalar_t* base = dst.data_ptr<scalar_t>() + b * dst.stride(1) + h * cols;
  for (int64_t r = 0; r < count; ++r) {
    scalar_t* row = base + (first + r) * dst.stride(0);
    for (int64_t c = 0; c < cols; ++c) row[c] = static_cast<scalar_t>(src[r * ld + offset + c]);
  }
}

// The backward pass works on transposed tiles, [keys x queries]: then every product reads
// its operands row by row (dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T) and no tile is
// ever transposed; the softmax statistics of a query become a vector along each row.
template <typename scalar_t>
void backward_kernel(const Inputs& in, const bool* mask, const AttentionShape& s,
                     const DropoutParams& dropout, const at::Tensor& grad_out,
                     const at::Tensor& out, const at::Tensor& lse, AttentionGrads& grads) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Q = s.num_queries, K = s.num_keys, H = s.num_heads;
  const int64_t hd = s.head_dim, vd = s.value_head_dim, qk = 2 * hd;
  const acc_t scale = static_cast<acc_t>(1.0 / std::sqrt(2.0 * static_cast<double>(hd)));
  const acc_t* lse_data = lse.const_data_ptr<acc_t>();

  // Each task owns one (batch, head): its slices of every gradient are disjoint from the
  // others', so no reduction across threads is needed.
  const auto key_counts = unpadded_key_counts(mask, s.batch, K);

  // head-major, as in the forward pass
  at::parallel_for(0, s.batch * H, 1, [&](int64_t begin, int64_t end) {
    // the head's keys as [k_c | k_p] rows and transposed, its values as rows
    std::vector<acc_t> keys(K * qk), keys_t(qk * K), values(K * vd);
    std::vector<acc_t> dkeys(K * qk), dvalues(K * vd);
    // a block of queries: [q_c | q_p] and dO as rows and transposed, the query statistics
    std::vector<acc_t> queries(kQueryBlock * qk), queries_t(qk * kQueryBlock);
    std::vector<acc_t> dout(kQueryBlock * vd), dout_t(vd * kQueryBlock), outs(kQueryBlock * vd);
    std::vector<acc_t> delta(kQueryBlock), lse_block(kQueryBlock), dqueries_t(qk * kQueryBlock);
    // [keys x queries] tiles: P^T, dP^T (then dS^T), and P^T after dropout
    std::vector<acc_t> probs_t(kKeyBlock * kQueryBlock), dprobs_t(kKeyBlock * kQueryBlock);
    std::vector<acc_t> dropped_t(dropout.enabled ? kKeyBlock * kQueryBlock : 0);
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t h = pair / s.batch, b = pair % s.batch, bh = b * H + h, Kb = key_counts[b];
      const bool* mask_b = mask ? mask + b * K : nullptr;
      pack_rows(head_rows<scalar_t>(in.k_content, b, h, hd), 0, Kb, hd, keys.data(), qk, 0);
      pack_rows(head_rows<scalar_t>(in.k_spatial, b, h, hd), 0, Kb, hd, keys.data(), qk, hd);
      transpose_tile(keys.data(), Kb, qk, qk, keys_t.data(), K);
      pack_rows(head_rows<scalar_t>(in.value, b, h, vd), 0, Kb, vd, values.data(), vd, 0);
      std::fill(dkeys.begin(), dkeys.end(), acc_t(0));
      std::fill(dvalues.begin(), dvalues.end(), acc_t(0));
      for (int64_t q0 = 0; q0 < Q; q0 += kQueryBlock) {
        const int64_t nq = std::min(kQueryBlock, Q - q0);
        pack_rows(head_rows<scalar_t>(in.q_content, b, h, hd), q0, nq, hd, queries.data(), qk, 0);
        pack_rows(head_rows<scalar_t>(in.q_spatial, b, h, hd), q0, nq, hd, queries.data(), qk, hd);
        transpose_tile(queries.data(), nq, qk, qk, queries_t.data(), kQueryBlock);
        pack_rows(head_rows<scalar_t>(grad_out, b, h, vd), q0, nq, vd, dout.data(), vd, 0);
        transpose_tile(dout.data(), nq, vd, vd, dout_t.data(), kQueryBlock);
        pack_rows(head_rows<scalar_t>(out, b, h, vd), q0, nq, vd, outs.data(), vd, 0);
        for (int64_t i = 0; i < nq; ++i) {
          // delta_i = dO_i . O_i, the softmax-gradient correction (dropout included)
          acc_t d = 0;
          for (int64_t c = 0; c < vd; ++c) d += dout[i * vd + c] * outs[i * vd + c];
          delta[i] = d;
          lse_block[i] = lse_data[bh * Q + q0 + i];
        }
        std::fill(dqueries_t.begin(), dqueries_t.end(), acc_t(0));
        for (int64_t k0 = 0; k0 < Kb; k0 += kKeyBlock) {
          const int64_t nk = std::min(kKeyBlock, Kb - k0);
          // S^T = scale k q^T ; dP^T = v dO^T
          gemm_tile(nk, nq, qk, scale, keys.data() + k0 * qk, qk, queries_t.data(), kQueryBlock,
                    acc_t(0), probs_t.data(), kQueryBlock);
          gemm_tile(nk, nq, vd, acc_t(1), values.data() + k0 * vd, vd, dout_t.data(), kQueryBlock,
                    acc_t(0), dprobs_t.data(), kQueryBlock);
          for (int64_t j = 0; j < nk; ++j) {
            acc_t* p = probs_t.data() + j * kQueryBlock;
            acc_t* dp = dprobs_t.data() + j * kQueryBlock;
            acc_t* pd = dropout.enabled ? dropped_t.data() + j * kQueryBlock : p;
            if (mask_b && mask_b[k0 + j]) {
              // a padded key takes no attention and gets no gradient
              std::fill(p, p + nq, acc_t(0));
              std::fill(dp, dp + nq, acc_t(0));
              std::fill(pd, pd + nq, acc_t(0));
              continue;
            }
            exp_minus_lse(p, lse_block.data(), nq);
            if (dropout.enabled) {
              const uint64_t first = (bh * Q + q0) * K + k0 + j;
              std::copy(p, p + nq, pd);
              apply_dropout(pd, nq, dropout, first, K);
              apply_dropout(dp, nq, dropout, first, K);
            }
            softmax_grad(p, dp, delta.data(), nq);
          }
          const acc_t* p_used = dropout.enabled ? dropped_t.data() : probs_t.data();
          // dv += P_dropped^T dO ; dk += scale dS^T q ; dq^T += scale k^T dS^T
          gemm_tile(nk, vd, nq, acc_t(1), p_used, kQueryBlock, dout.data(), vd, acc_t(1),
                    dvalues.data() + k0 * vd, vd);
          gemm_tile(nk, qk, nq, scale, dprobs_t.data(), kQueryBlock, queries.data(), qk, acc_t(1),
                    dkeys.data() + k0 * qk, qk);
          gemm_tile(qk, nq, nk, scale, keys_t.data() + k0, K, dprobs_t.data(), kQueryBlock,
                    acc_t(1), dqueries_t.data(), kQueryBlock);
        }
        // dq^T [qk x nq] back to rows, reusing the queries buffer
        transpose_tile(dqueries_t.data(), qk, nq, kQueryBlock, queries.data(), qk);
        unpack_rows<scalar_t>(queries.data(), qk, 0, q0, nq, hd, grads.q_content, b, h);
        unpack_rows<scalar_t>(queries.data(), qk, hd, q0, nq, hd, grads.q_spatial, b, h);
      }
      unpack_rows<scalar_t>(dkeys.data(), qk, 0, 0, K, hd, grads.k_content, b, h);
      unpack_rows<scalar_t>(dkeys.data(), qk, hd, 0, K, hd, grads.k_spatial, b, h);
      unpack_rows<scalar_t>(dvalues.data(), vd, 0, 0, K, vd, grads.value, b, h);
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
  at::Tensor out, lse;
  std::tie(out, lse) = allocate_attention_outputs(q_content, value, shape);
  if (out.numel() == 0) return {out, lse};
  const auto mask = contiguous_or_undefined(key_padding_mask);
  const bool* mask_data = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_content.scalar_type(),
                                  "attention_forward_cpu", [&] {
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
  const auto shape = check_attention_backward_inputs(grad_out, q_content, q_spatial, k_content,
                                                     k_spatial, value, key_padding_mask, out,
                                                     lse, num_heads);
  TORCH_CHECK(q_content.device().is_cpu(), "attention_backward_cpu: expected CPU tensors");
  const auto dropout = make_dropout_params(dropout_p, rng_state);
  auto grads = allocate_attention_grads(q_content, q_spatial, k_content, k_spatial, value, out,
                                        shape);
  if (!grads.has_work) return grads.as_tuple();
  const auto dtype = q_content.scalar_type();
  const Inputs in{unit_channel_stride(q_content), unit_channel_stride(q_spatial),
                  unit_channel_stride(k_content), unit_channel_stride(k_spatial),
                  unit_channel_stride(value)};
  const auto grad_c = unit_channel_stride(grad_out.to(dtype));
  const auto out_c = unit_channel_stride(out);
  const auto lse_c = lse.to(lse_dtype_for(dtype)).contiguous();
  const auto mask = contiguous_or_undefined(key_padding_mask);
  const bool* mask_data = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(in, mask_data, shape, dropout, grad_c, out_c, lse_c, grads);
  });
  return grads.as_tuple();
}

TORCH_LIBRARY_IMPL(conditional_detr, CPU, m) {
  m.impl("conditional_cross_attention", &attention_forward_cpu);
  m.impl("_conditional_cross_attention_backward", &attention_backward_cpu);
}

}  // namespace conditional_detr
