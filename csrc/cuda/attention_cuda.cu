// CUDA kernels of conditional cross-attention, flash-attention style: each block streams key
// (or query) tiles through shared memory, keeps an online softmax in registers, and never
// writes the [queries, keys] matrix to memory; the backward pass recomputes it from the saved
// log-sum-exp in two kernels (dq by query, dk/dv by key) so that no atomics are needed.
//
// Threads: kSplit consecutive lanes share one query (forward, dq) or one key (dk/dv) and take
// every kSplit-th key (query) of a tile; their partial results are merged with warp shuffles at
// the end. This gives B * heads * ceil(Q / kRowsPerBlock) blocks, enough to fill a GPU at
// batch 2. Heads up to kMaxHeadDim channels are handled by a compile-time width padded with
// zeros; logits are kept in base 2 (scale * log2 e folded into the queries) so exp2 applies.
// Only c10 CUDA headers are used (not ATen/cuda/CUDAContext.h), so the build needs the CUDA
// runtime headers alone, not the cuBLAS/cuSPARSE development headers.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr int kSplit = 4;
constexpr int kRowsPerBlock = 16;
constexpr int kThreads = kSplit * kRowsPerBlock;
constexpr int kMaxHeadDim = 64;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// Tile geometry for a padded head width D: shared-memory rows are padded by 4 elements so that
// the kSplit different rows a warp reads at once fall in different banks.
template <int D, typename acc_t>
struct Tile {
  static constexpr int kRows = (D <= 32 ? 64 : 32) * 4 / static_cast<int>(sizeof(acc_t));
  static constexpr int kQKStride = 2 * D + 4;
  static constexpr int kVStride = D + 4;
  static_assert(kRows % kSplit == 0, "tile rows must split evenly");
};

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t infinity() {
  return static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
__device__ __forceinline__ acc_t split_sum(acc_t x) {
#pragma unroll
  for (int offset = 1; offset < kSplit; offset *= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename acc_t>
__device__ __forceinline__ acc_t split_max(acc_t x) {
#pragma unroll
  for (int offset = 1; offset < kSplit; offset *= 2) x = max(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

template <typename scalar_t, typename acc_t>
struct Params {
  const scalar_t* q_content;  // [Q, B, H * hd], contiguous
  const scalar_t* q_spatial;
  const scalar_t* k_content;  // [K, B, H * hd]
  const scalar_t* k_spatial;
  const scalar_t* value;      // [K, B, H * vd]
  const bool* mask;           // [B, K] or null
  scalar_t* out;              // [Q, B, H * vd]
  acc_t* lse;                 // [B, H, Q], natural log; +inf for rows without keys
  // backward only
  const scalar_t* grad_out;   // [Q, B, H * vd]
  const acc_t* delta;         // [B, H, Q]: rowsum(dO * O)
  scalar_t* grad_q_content;
  scalar_t* grad_q_spatial;
  scalar_t* grad_k_content;
  scalar_t* grad_k_spatial;
  scalar_t* grad_value;
  int Q, K, B, H, hd, vd;
  acc_t scale;       // (2 hd)^-1/2
  acc_t scale_log2;  // scale * log2(e)
  DropoutParams dropout;
};

// Rows [first, first + kRows) of one head of a qk pair and of its values into shared memory,
// widened to acc_t and zero-padded beyond the real width and length.
template <int D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pair_tile(const scalar_t* content, const scalar_t* spatial,
                                               int length, int first, int b, int h, int B, int H,
                                               int width, acc_t* tile) {
  using T = Tile<D, acc_t>;
  const int64_t row_stride = static_cast<int64_t>(B) * H * width;
  const int64_t head_offset = static_cast<int64_t>(b) * H * width + static_cast<int64_t>(h) * width;
  for (int e = threadIdx.x; e < T::kRows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int row = first + r;
    acc_t c = 0, s = 0;
    if (row < length && d < width) {
      const int64_t offset = row * row_stride + head_offset + d;
      c = static_cast<acc_t>(content[offset]);
      if (spatial != nullptr) s = static_cast<acc_t>(spatial[offset]);
    }
    tile[r * T::kQKStride + d] = c;
    if (spatial != nullptr) tile[r * T::kQKStride + D + d] = s;
  }
}

template <int D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_value_tile(const scalar_t* value, int length, int first,
                                                int b, int h, int B, int H, int width,
                                                acc_t* tile) {
  using T = Tile<D, acc_t>;
  const int64_t row_stride = static_cast<int64_t>(B) * H * width;
  const int64_t head_offset = static_cast<int64_t>(b) * H * width + static_cast<int64_t>(h) * width;
  for (int e = threadIdx.x; e < T::kRows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    const int row = first + r;
    acc_t v = 0;
    if (row < length && d < width) v = static_cast<acc_t>(value[row * row_stride + head_offset + d]);
    tile[r * T::kVStride + d] = v;
  }
}

// Flat index of channel 0 of head h of batch element b at position `row` of a
// sequence-first [length, batch, heads * width] tensor.
__device__ __forceinline__ int64_t element_offset(int row, int b, int h, int B, int H, int width) {
  return (static_cast<int64_t>(row) * B + b) * H * width + static_cast<int64_t>(h) * width;
}

// The keys, values and padding flags of the key tile starting at k0 (keys past K count as
// padding), for the kernels that stream keys.
template <int D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_key_tile(const Params<scalar_t, acc_t>& p, int k0, int b,
                                              int h, acc_t* keys, acc_t* values, bool* padded) {
  using T = Tile<D, acc_t>;
  load_pair_tile<D>(p.k_content, p.k_spatial, p.K, k0, b, h, p.B, p.H, p.hd, keys);
  load_value_tile<D>(p.value, p.K, k0, b, h, p.B, p.H, p.vd, values);
  for (int r = threadIdx.x; r < T::kRows; r += kThreads) {
    padded[r] = k0 + r >= p.K || (p.mask != nullptr && p.mask[static_cast<int64_t>(b) * p.K + k0 + r]);
  }
}

template <typename acc_t>
__device__ __forceinline__ bool dropout_keep(const DropoutParams& dropout, int64_t bh, int Q,
                                             int K, int q, int k) {
  const uint64_t index = (static_cast<uint64_t>(bh) * Q + q) * static_cast<uint64_t>(K) + k;
  return dropout_hash(dropout.seed, index) >= dropout.threshold;
}

template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
attention_forward_kernel(const Params<scalar_t, acc_t> p) {
  using T = Tile<D, acc_t>;
  constexpr int kPerThread = T::kRows / kSplit;
  __shared__ __align__(16) acc_t keys[T::kRows * T::kQKStride];
  __shared__ __align__(16) acc_t values[T::kRows * T::kVStride];
  __shared__ bool padded[T::kRows];

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int split = threadIdx.x % kSplit;
  const int q = blockIdx.x * kRowsPerBlock + threadIdx.x / kSplit;
  const bool valid = q < p.Q;
  const int64_t q_offset = element_offset(q, b, h, p.B, p.H, p.hd);

  acc_t query[2 * D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const bool real = valid && d < p.hd;
    query[d] = real ? static_cast<acc_t>(p.q_content[q_offset + d]) * p.scale_log2 : acc_t(0);
    query[D + d] = real ? static_cast<acc_t>(p.q_spatial[q_offset + d]) * p.scale_log2 : acc_t(0);
  }
  acc_t acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0;
  acc_t row_max = -infinity<acc_t>(), row_sum = 0;

  for (int k0 = 0; k0 < p.K; k0 += T::kRows) {
    __syncthreads();  // the previous tile is no longer read
    load_key_tile<D>(p, k0, b, h, keys, values, padded);
    __syncthreads();

    acc_t logits[kPerThread];
    acc_t tile_max = -infinity<acc_t>();
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int j = t * kSplit + split;
      const acc_t* key = keys + j * T::kQKStride;
      acc_t dot = 0;
#pragma unroll
      for (int d = 0; d < 2 * D; ++d) dot += query[d] * key[d];
      logits[t] = padded[j] ? -infinity<acc_t>() : dot;
      tile_max = max(tile_max, logits[t]);
    }
    const acc_t new_max = max(row_max, tile_max);
    if (new_max == -infinity<acc_t>()) continue;  // only padding so far
    const acc_t correction = exp2_(row_max - new_max);
    row_sum *= correction;
#pragma unroll
    for (int d = 0; d < D; ++d) acc[d] *= correction;
#pragma unroll
    for (int t = 0; t < kPerThread; ++t) {
      const int j = t * kSplit + split;
      acc_t prob = exp2_(logits[t] - new_max);
      row_sum += prob;
      if (p.dropout.enabled) {
        prob = dropout_keep<acc_t>(p.dropout, bh, p.Q, p.K, q, k0 + j)
                   ? prob * static_cast<acc_t>(p.dropout.keep_scale) : acc_t(0);
      }
      const acc_t* v = values + j * T::kVStride;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] += prob * v[d];
    }
    row_max = new_max;
  }

  // merge the kSplit partial softmaxes of this query
  const acc_t merged_max = split_max(row_max);
  const acc_t correction =
      merged_max == -infinity<acc_t>() ? acc_t(0) : exp2_(row_max - merged_max);
  const acc_t merged_sum = split_sum(row_sum * correction);
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = split_sum(acc[d] * correction);
  if (!valid) return;
  const bool empty = merged_sum == acc_t(0);
  const acc_t inv = empty ? acc_t(0) : acc_t(1) / merged_sum;
  const int64_t o_offset = element_offset(q, b, h, p.B, p.H, p.vd);
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d % kSplit == split && d < p.vd) p.out[o_offset + d] = static_cast<scalar_t>(acc[d] * inv);
  }
  if (split == 0) {
    p.lse[static_cast<int64_t>(bh) * p.Q + q] =
        empty ? infinity<acc_t>() : (merged_max + log2_(merged_sum)) * static_cast<acc_t>(kLn2);
  }
}

// dq: one query per kSplit threads, streaming key tiles as in the forward pass.
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
attention_backward_dq_kernel(const Params<scalar_t, acc_t> p) {
  using T = Tile<D, acc_t>;
  constexpr int kPerThread = T::kRows / kSplit;
  __shared__ __align__(16) acc_t keys[T::kRows * T::kQKStride];
  __shared__ __align__(16) acc_t values[T::kRows * T::kVStride];
  __shared__ bool padded[T::kRows];

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int split = threadIdx.x % kSplit;
  const int q = blockIdx.x * kRowsPerBlock + threadIdx.x / kSplit;
  const bool valid = q < p.Q;
  const int64_t q_offset = element_offset(q, b, h, p.B, p.H, p.hd);
  const int64_t o_offset = element_offset(q, b, h, p.B, p.H, p.vd);

  acc_t query[2 * D], grad_out[D], grad_query[2 * D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const bool real = valid && d < p.hd;
    query[d] = real ? static_cast<acc_t>(p.q_content[q_offset + d]) * p.scale_log2 : acc_t(0);
    query[D + d] = real ? static_cast<acc_t>(p.q_spatial[q_offset + d]) * p.scale_log2 : acc_t(0);
    grad_out[d] = valid && d < p.vd ? static_cast<acc_t>(p.grad_out[o_offset + d]) : acc_t(0);
    grad_query[d] = 0;
    grad_query[D + d] = 0;
  }
  const int64_t row = static_cast<int64_t>(bh) * p.Q + q;
  const acc_t lse_log2 = valid ? p.lse[row] * static_cast<acc_t>(kLog2e) : infinity<acc_t>();
  const acc_t delta = valid ? p.delta[row] : acc_t(0);
  const acc_t keep_scale = static_cast<acc_t>(p.dropout.keep_scale);

  for (int k0 = 0; k0 < p.K; k0 += T::kRows) {
    __syncthreads();
    load_key_tile<D>(p, k0, b, h, keys, values, padded);
    __syncthreads();
    // keys are independent here (no tile-wide max), so a short unroll is enough for ILP and
    // keeps the q, dO and dq registers from spilling
#pragma unroll 2
    for (int t = 0; t < kPerThread; ++t) {
      const int j = t * kSplit + split;
      const acc_t* key = keys + j * T::kQKStride;
      const acc_t* v = values + j * T::kVStride;
      acc_t logit = 0, dprob = 0;
#pragma unroll
      for (int d = 0; d < 2 * D; ++d) logit += query[d] * key[d];
#pragma unroll
      for (int d = 0; d < D; ++d) dprob += grad_out[d] * v[d];
      const acc_t prob = padded[j] ? acc_t(0) : exp2_(logit - lse_log2);
      if (p.dropout.enabled) {
        dprob = dropout_keep<acc_t>(p.dropout, bh, p.Q, p.K, q, k0 + j) ? dprob * keep_scale
                                                                        : acc_t(0);
      }
      const acc_t dlogit = prob * (dprob - delta);
#pragma unroll
      for (int d = 0; d < 2 * D; ++d) grad_query[d] += dlogit * key[d];
    }
  }
#pragma unroll
  for (int d = 0; d < 2 * D; ++d) grad_query[d] = split_sum(grad_query[d]);
  if (!valid) return;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d % kSplit == split && d < p.hd) {
      p.grad_q_content[q_offset + d] = static_cast<scalar_t>(grad_query[d] * p.scale);
      p.grad_q_spatial[q_offset + d] = static_cast<scalar_t>(grad_query[D + d] * p.scale);
    }
  }
}

// dk, dv: one key per kSplit threads, streaming query tiles (queries, dO, lse, delta).
template <int D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
attention_backward_dkv_kernel(const Params<scalar_t, acc_t> p) {
  using T = Tile<D, acc_t>;
  constexpr int kPerThread = T::kRows / kSplit;
  __shared__ __align__(16) acc_t queries[T::kRows * T::kQKStride];
  __shared__ __align__(16) acc_t grad_outs[T::kRows * T::kVStride];
  __shared__ acc_t lse_log2[T::kRows];
  __shared__ acc_t deltas[T::kRows];

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int split = threadIdx.x % kSplit;
  const int k = blockIdx.x * kRowsPerBlock + threadIdx.x / kSplit;
  const bool valid = k < p.K;
  const bool padded = !valid || (p.mask != nullptr && p.mask[static_cast<int64_t>(b) * p.K + k]);
  const int64_t k_offset = element_offset(k, b, h, p.B, p.H, p.hd);
  const int64_t v_offset = element_offset(k, b, h, p.B, p.H, p.vd);

  acc_t key[2 * D], value[D], grad_key[2 * D], grad_value[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    const bool real = valid && d < p.hd;
    key[d] = real ? static_cast<acc_t>(p.k_content[k_offset + d]) : acc_t(0);
    key[D + d] = real ? static_cast<acc_t>(p.k_spatial[k_offset + d]) : acc_t(0);
    value[d] = valid && d < p.vd ? static_cast<acc_t>(p.value[v_offset + d]) : acc_t(0);
    grad_key[d] = 0;
    grad_key[D + d] = 0;
    grad_value[d] = 0;
  }
  const acc_t keep_scale = static_cast<acc_t>(p.dropout.keep_scale);

  for (int q0 = 0; q0 < p.Q; q0 += T::kRows) {
    __syncthreads();
    load_pair_tile<D>(p.q_content, p.q_spatial, p.Q, q0, b, h, p.B, p.H, p.hd, queries);
    load_value_tile<D>(p.grad_out, p.Q, q0, b, h, p.B, p.H, p.vd, grad_outs);
    for (int r = threadIdx.x; r < T::kRows; r += kThreads) {
      const bool real = q0 + r < p.Q;
      const int64_t row = static_cast<int64_t>(bh) * p.Q + q0 + r;
      lse_log2[r] = real ? p.lse[row] * static_cast<acc_t>(kLog2e) : infinity<acc_t>();
      deltas[r] = real ? p.delta[row] : acc_t(0);
    }
    __syncthreads();
    if (padded) continue;  // a padding key gets no gradient; no barrier below this point
#pragma unroll 2
    for (int t = 0; t < kPerThread; ++t) {
      const int i = t * kSplit + split;
      const acc_t* query = queries + i * T::kQKStride;
      const acc_t* grad_out = grad_outs + i * T::kVStride;
      acc_t logit = 0, dprob = 0;
#pragma unroll
      for (int d = 0; d < 2 * D; ++d) logit += query[d] * key[d];
#pragma unroll
      for (int d = 0; d < D; ++d) dprob += grad_out[d] * value[d];
      const acc_t prob = exp2_(logit * p.scale_log2 - lse_log2[i]);
      acc_t kept_prob = prob;
      if (p.dropout.enabled) {
        const bool keep = dropout_keep<acc_t>(p.dropout, bh, p.Q, p.K, q0 + i, k);
        kept_prob = keep ? prob * keep_scale : acc_t(0);
        dprob = keep ? dprob * keep_scale : acc_t(0);
      }
      const acc_t dlogit = prob * (dprob - deltas[i]);
#pragma unroll
      for (int d = 0; d < D; ++d) grad_value[d] += kept_prob * grad_out[d];
#pragma unroll
      for (int d = 0; d < 2 * D; ++d) grad_key[d] += dlogit * query[d];
    }
  }
#pragma unroll
  for (int d = 0; d < 2 * D; ++d) grad_key[d] = split_sum(grad_key[d]);
#pragma unroll
  for (int d = 0; d < D; ++d) grad_value[d] = split_sum(grad_value[d]);
  if (!valid) return;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d % kSplit == split) {
      if (d < p.hd) {
        p.grad_k_content[k_offset + d] = static_cast<scalar_t>(grad_key[d] * p.scale);
        p.grad_k_spatial[k_offset + d] = static_cast<scalar_t>(grad_key[D + d] * p.scale);
      }
      if (d < p.vd) p.grad_value[v_offset + d] = static_cast<scalar_t>(grad_value[d]);
    }
  }
}

template <typename scalar_t, typename acc_t>
Params<scalar_t, acc_t> make_params(const at::Tensor& q_content, const at::Tensor& q_spatial,
                                    const at::Tensor& k_content, const at::Tensor& k_spatial,
                                    const at::Tensor& value, const at::Tensor& mask,
                                    const AttentionShape& s, const DropoutParams& dropout) {
  TORCH_CHECK(s.num_queries < (1ll << 31) && s.num_keys < (1ll << 31) &&
                  s.batch * s.num_heads < 65536,
              "conditional_cross_attention (CUDA): sizes exceed the kernel's index range");
  Params<scalar_t, acc_t> p{};
  p.q_content = q_content.const_data_ptr<scalar_t>();
  p.q_spatial = q_spatial.const_data_ptr<scalar_t>();
  p.k_content = k_content.const_data_ptr<scalar_t>();
  p.k_spatial = k_spatial.const_data_ptr<scalar_t>();
  p.value = value.const_data_ptr<scalar_t>();
  p.mask = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.Q = static_cast<int>(s.num_queries);
  p.K = static_cast<int>(s.num_keys);
  p.B = static_cast<int>(s.batch);
  p.H = static_cast<int>(s.num_heads);
  p.hd = static_cast<int>(s.head_dim);
  p.vd = static_cast<int>(s.value_head_dim);
  const double scale = 1.0 / std::sqrt(2.0 * static_cast<double>(s.head_dim));
  p.scale = static_cast<acc_t>(scale);
  p.scale_log2 = static_cast<acc_t>(scale * kLog2e);
  p.dropout = dropout;
  return p;
}

// Calls f.template operator()<D>() with the padded head width for these sizes.
template <typename F>
void dispatch_head_width(const AttentionShape& s, F&& f) {
  const int64_t width = std::max(s.head_dim, s.value_head_dim);
  TORCH_CHECK(width <= kMaxHeadDim, "conditional_cross_attention (CUDA): head widths up to ",
              kMaxHeadDim, " channels are supported, got ", s.head_dim, " (query/key) and ",
              s.value_head_dim, " (value)");
  if (width <= 32) {
    f.template operator()<32>();
  } else {
    f.template operator()<64>();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(
    const at::Tensor& q_content, const at::Tensor& q_spatial, const at::Tensor& k_content,
    const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, int64_t num_heads, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const auto shape = check_attention_inputs(q_content, q_spatial, k_content, k_spatial, value,
                                            key_padding_mask, num_heads);
  TORCH_CHECK(q_content.is_cuda(), "attention_forward_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(q_content.device());
  const auto dropout = make_dropout_params(dropout_p, rng_state);
  const auto dtype = q_content.scalar_type();
  at::Tensor out, lse;
  std::tie(out, lse) = allocate_attention_outputs(q_content, value, shape);
  if (out.numel() == 0) return {out, lse};
  const auto qc = q_content.contiguous(), qs = q_spatial.contiguous();
  const auto kc = k_content.contiguous(), ks = k_spatial.contiguous(), v = value.contiguous();
  const auto mask = contiguous_or_undefined(key_padding_mask);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto params = make_params<scalar_t, acc_t>(qc, qs, kc, ks, v, mask, shape, dropout);
    params.out = out.data_ptr<scalar_t>();
    params.lse = lse.data_ptr<acc_t>();
    const dim3 grid((shape.num_queries + kRowsPerBlock - 1) / kRowsPerBlock,
                    shape.batch * num_heads);
    dispatch_head_width(shape, [&]<int D>() {
      attention_forward_kernel<D, scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_spatial,
    const at::Tensor& k_content, const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_heads, double dropout_p,
    const std::optional<at::Tensor>& rng_state) {
  const auto shape = check_attention_backward_inputs(grad_out, q_content, q_spatial, k_content,
                                                     k_spatial, value, key_padding_mask, out,
                                                     lse, num_heads);
  TORCH_CHECK(q_content.is_cuda(), "attention_backward_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(q_content.device());
  const auto dropout = make_dropout_params(dropout_p, rng_state);
  const auto dtype = q_content.scalar_type();
  const auto lse_dtype = lse_dtype_for(dtype);
  auto grads = allocate_attention_grads(q_content, q_spatial, k_content, k_spatial, value, out,
                                        shape);
  if (!grads.has_work) return grads.as_tuple();
  const auto qc = q_content.contiguous(), qs = q_spatial.contiguous();
  const auto kc = k_content.contiguous(), ks = k_spatial.contiguous(), v = value.contiguous();
  const auto mask = contiguous_or_undefined(key_padding_mask);
  const auto go = grad_out.to(dtype).contiguous();
  const auto lse_c = lse.to(lse_dtype).contiguous();
  // delta = rowsum(dO * O) per head, [B, H, Q]; with dropout O already holds the dropped weights
  const auto delta = (go.to(lse_dtype) * out.to(lse_dtype))
                         .view({shape.num_queries, shape.batch, num_heads, shape.value_head_dim})
                         .sum(-1)
                         .permute({1, 2, 0})
                         .contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "attention_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto params = make_params<scalar_t, acc_t>(qc, qs, kc, ks, v, mask, shape, dropout);
    params.grad_out = go.const_data_ptr<scalar_t>();
    params.lse = const_cast<acc_t*>(lse_c.const_data_ptr<acc_t>());
    params.delta = delta.const_data_ptr<acc_t>();
    params.grad_q_content = grads.q_content.data_ptr<scalar_t>();
    params.grad_q_spatial = grads.q_spatial.data_ptr<scalar_t>();
    params.grad_k_content = grads.k_content.data_ptr<scalar_t>();
    params.grad_k_spatial = grads.k_spatial.data_ptr<scalar_t>();
    params.grad_value = grads.value.data_ptr<scalar_t>();
    const dim3 dq_grid((shape.num_queries + kRowsPerBlock - 1) / kRowsPerBlock,
                       shape.batch * num_heads);
    const dim3 dkv_grid((shape.num_keys + kRowsPerBlock - 1) / kRowsPerBlock,
                        shape.batch * num_heads);
    dispatch_head_width(shape, [&]<int D>() {
      attention_backward_dq_kernel<D, scalar_t, acc_t><<<dq_grid, kThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      attention_backward_dkv_kernel<D, scalar_t, acc_t><<<dkv_grid, kThreads, 0, stream>>>(params);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grads.as_tuple();
}

TORCH_LIBRARY_IMPL(conditional_detr, CUDA, m) {
  m.impl("conditional_cross_attention", &attention_forward_cuda);
  m.impl("_conditional_cross_attention_backward", &attention_backward_cuda);
}

}  // namespace conditional_detr
