// CUDA kernel of the hashed dropout; see ../cpu/dropout_cpu.cpp. Same hash, same indices, so
// the two devices draw the same mask from the same seed.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// grid-stride over the flat elements
template <typename scalar_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ out,
                               int64_t count, uint64_t seed, uint32_t threshold,
                               at::opmath_type<scalar_t> keep_scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += stride) {
    out[i] = dropout_hash(seed, i) >= threshold
                 ? static_cast<scalar_t>(static_cast<acc_t>(input[i]) * keep_scale)
                 : static_cast<scalar_t>(0);
  }
}

}  // namespace

at::Tensor dropout_cuda(const at::Tensor& input, double p, const at::Tensor& rng_state) {
  TORCH_CHECK(input.is_cuda(), "dropout_cuda: expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(input.device());
  auto prepared = prepare_dropout(input, p, rng_state);
  const int64_t count = input.numel();
  if (!prepared.params.enabled || count == 0) return prepared.out.copy_(prepared.input);
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, kMaxBlocks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        prepared.input.data_ptr<scalar_t>(), prepared.out.data_ptr<scalar_t>(), count,
        prepared.params.seed, prepared.params.threshold, static_cast<acc_t>(1.0 / (1.0 - p)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return prepared.out;
}

TORCH_LIBRARY_IMPL(conditional_detr, CUDA, m) { m.impl("dropout", &dropout_cuda); }

}  // namespace conditional_detr
