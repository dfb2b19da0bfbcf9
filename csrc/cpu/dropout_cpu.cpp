// CPU kernel of the hashed dropout: out = input * keep / (1 - p), where keep is the dropout hash
// of (seed, flat element index) at or above the threshold. The mask is a pure function of the
// seed and the index, so the backward pass is this same kernel on the gradient: nothing is
// stored between the two, and no stateful generator is drawn element by element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "vector.h"

namespace conditional_detr {
namespace {

// elements per task: the hash costs a fraction of a nanosecond, so small tasks are not worth a
// thread
constexpr int64_t kGrain = 1 << 16;

template <typename scalar_t>
CDETR_ALWAYS_INLINE void dropout_range_body(const scalar_t* input, scalar_t* out, int64_t begin,
                                            int64_t end, uint64_t seed, uint32_t threshold,
                                            at::opmath_type<scalar_t> keep_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = begin; i < end; ++i) {
    const bool keep = dropout_hash(seed, i) >= threshold;
    out[i] = keep ? static_cast<scalar_t>(static_cast<acc_t>(input[i]) * keep_scale)
                  : static_cast<scalar_t>(0);
  }
}

// The AVX-512 build runs several times faster than the baseline (the hash's 64-bit
// multiplies vectorize with vpmullq), the AVX2 one about twice as fast.
CDETR_VECTOR_LEVELS_WITH(template <typename scalar_t>, void, dropout_range, dropout_range_body<scalar_t>,
                         (const scalar_t* input, scalar_t* out, int64_t begin, int64_t end, uint64_t seed,
                          uint32_t threshold, at::opmath_type<scalar_t> keep_scale),
                         (input, out, begin, end, seed, threshold, keep_scale))

template <typename scalar_t>
void dropout_kernel(const scalar_t* input, scalar_t* out, int64_t count,
                    const DropoutParams& dropout, double p) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t keep_scale = static_cast<acc_t>(1.0 / (1.0 - p));
  at::parallel_for(0, count, kGrain, [&](int64_t begin, int64_t end) {
    dropout_range<scalar_t>(input, out, begin, end, dropout.seed, dropout.threshold, keep_scale);
  });
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& input, double p, const at::Tensor& rng_state) {
  TORCH_CHECK(input.device().is_cpu(), "dropout_cpu: expected a CPU tensor");
  auto prepared = prepare_dropout(input, p, rng_state);
  if (!prepared.params.enabled || input.numel() == 0) return prepared.out.copy_(prepared.input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_cpu", [&] {
    dropout_kernel<scalar_t>(prepared.input.data_ptr<scalar_t>(), prepared.out.data_ptr<scalar_t>(),
                             input.numel(), prepared.params, p);
  });
  return prepared.out;
}

TORCH_LIBRARY_IMPL(conditional_detr, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace conditional_detr
