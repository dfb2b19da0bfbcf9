// CUDA kernels of the conditional spatial query λq ⊙ sinusoidal(reference points); the channel
// layout is described in ../cpu/sine_query_cpu.cpp.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t angle_rate(int64_t pair, int64_t half) {
  // 2π / T^(2 pair / half), T = 10000, in the accumulation type as on the CPU
  return static_cast<acc_t>(6.283185307179586) /
         pow(static_cast<acc_t>(10000.0), static_cast<acc_t>(2 * pair) / static_cast<acc_t>(half));
}

__device__ __forceinline__ void sin_cos(float x, float* s, float* c) { sincosf(x, s, c); }
__device__ __forceinline__ void sin_cos(double x, double* s, double* c) { sincos(x, s, c); }

// One thread per (row, sine/cosine pair).
template <typename scalar_t>
__global__ void sine_query_forward_kernel(const scalar_t* __restrict__ points,
                                          const scalar_t* __restrict__ scale,
                                          scalar_t* __restrict__ out, int64_t rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t half = dim / 2, pairs_per_row = dim / 2;
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= rows * pairs_per_row) return;
  const int64_t r = index / pairs_per_row, pair = index % pairs_per_row;
  const int64_t axis = pair / (dim / 4);  // 0: y, 1: x
  const int64_t i = pair % (dim / 4);
  const acc_t p = static_cast<acc_t>(points[r * 2 + (axis == 0 ? 1 : 0)]);
  acc_t s, c;
  sin_cos(p * angle_rate<acc_t>(i, half), &s, &c);
  const int64_t channel = r * dim + axis * half + 2 * i;
  if (scale != nullptr) {
    s *= static_cast<acc_t>(scale[channel]);
    c *= static_cast<acc_t>(scale[channel + 1]);
  }
  out[channel] = static_cast<scalar_t>(s);
  out[channel + 1] = static_cast<scalar_t>(c);
}

// One warp per (row, axis): lanes split the pairs and reduce the coordinate's gradient.
template <typename scalar_t>
__global__ void sine_query_backward_kernel(const scalar_t* __restrict__ grad,
                                           const scalar_t* __restrict__ points,
                                           const scalar_t* __restrict__ scale,
                                           scalar_t* __restrict__ grad_points,
                                           scalar_t* __restrict__ grad_scale, int64_t rows,
                                           int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows * 2) return;  // whole warps exit together
  const int64_t r = warp / 2, axis = warp % 2;
  const int64_t half = dim / 2;
  const int coord = axis == 0 ? 1 : 0;
  const acc_t p = static_cast<acc_t>(points[r * 2 + coord]);
  acc_t d_point = 0;
  for (int64_t i = lane; i < dim / 4; i += 32) {
    const acc_t rate = angle_rate<acc_t>(i, half);
    acc_t s, c;
    sin_cos(p * rate, &s, &c);
    const int64_t channel = r * dim + axis * half + 2 * i;
    acc_t g_sin = static_cast<acc_t>(grad[channel]);
    acc_t g_cos = static_cast<acc_t>(grad[channel + 1]);
    if (scale != nullptr) {
      grad_scale[channel] = static_cast<scalar_t>(g_sin * s);
      grad_scale[channel + 1] = static_cast<scalar_t>(g_cos * c);
      g_sin *= static_cast<acc_t>(scale[channel]);
      g_cos *= static_cast<acc_t>(scale[channel + 1]);
    }
    d_point += rate * (g_sin * c - g_cos * s);
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    d_point += __shfl_xor_sync(0xffffffff, d_point, offset);
  }
  if (lane == 0) grad_points[r * 2 + coord] = static_cast<scalar_t>(d_point);
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

}  // namespace

at::Tensor sine_query_cuda(const at::Tensor& reference_points,
                           const std::optional<at::Tensor>& query_scale, int64_t dim) {
  TORCH_CHECK(reference_points.is_cuda(), "sine_query_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(reference_points.device());
  auto q = prepare_sine_query(reference_points, query_scale, dim);
  if (q.rows == 0) return q.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.points.scalar_type(),
                                  "sine_query_cuda", [&] {
    sine_query_forward_kernel<scalar_t><<<blocks_for(q.rows * dim / 2), kThreads, 0, stream>>>(
        q.points.const_data_ptr<scalar_t>(),
        q.scale.defined() ? q.scale.const_data_ptr<scalar_t>() : nullptr,
        q.out.data_ptr<scalar_t>(), q.rows, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return q.out;
}

std::tuple<at::Tensor, at::Tensor> sine_query_backward_cuda(
    const at::Tensor& grad, const at::Tensor& reference_points,
    const std::optional<at::Tensor>& query_scale, int64_t dim) {
  TORCH_CHECK(reference_points.is_cuda(), "sine_query_backward_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard guard(reference_points.device());
  auto q = prepare_sine_query_backward(grad, reference_points, query_scale, dim);
  if (q.rows == 0) return {q.grad_points, q.grad_scale};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.points.scalar_type(),
                                  "sine_query_backward_cuda", [&] {
    const bool scaled = q.scale.defined();
    sine_query_backward_kernel<scalar_t><<<blocks_for(q.rows * 2 * 32), kThreads, 0, stream>>>(
        q.grad.const_data_ptr<scalar_t>(), q.points.const_data_ptr<scalar_t>(),
        scaled ? q.scale.const_data_ptr<scalar_t>() : nullptr,
        q.grad_points.data_ptr<scalar_t>(), scaled ? q.grad_scale.data_ptr<scalar_t>() : nullptr,
        q.rows, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q.grad_points, q.grad_scale};
}

TORCH_LIBRARY_IMPL(conditional_detr, CUDA, m) {
  m.impl("conditional_spatial_query", &sine_query_cuda);
  m.impl("_conditional_spatial_query_backward", &sine_query_backward_cuda);
}

}  // namespace conditional_detr
