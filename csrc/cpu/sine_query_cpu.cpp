// CPU kernels of the conditional spatial query λq ⊙ sinusoidal(reference points).
//
// Channel c of the embedding (dim D, half = D / 2) reads coordinate y for c < half and x
// otherwise; within a half, j = c mod half has frequency 2π / T^(2 floor(j / 2) / half), even j
// gives the sine and odd j the cosine. Channels 2i and 2i+1 share an angle, so one sincos per
// pair serves both and the embedding itself is never written out.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr double kTemperature = 10000.0;
constexpr double kTwoPi = 6.283185307179586;

// 2π / T^(2i / half) for each of the D / 4 distinct frequencies, computed in float for the
// float types as the reference does, so angles agree to rounding.
template <typename acc_t>
std::vector<acc_t> angle_rates(int64_t dim) {
  const int64_t half = dim / 2;
  std::vector<acc_t> rates(dim / 4);
  for (int64_t i = 0; i < dim / 4; ++i) {
    const acc_t dim_t = std::pow(static_cast<acc_t>(kTemperature),
                                 static_cast<acc_t>(2 * i) / static_cast<acc_t>(half));
    rates[i] = static_cast<acc_t>(kTwoPi) / dim_t;
  }
  return rates;
}

template <typename scalar_t>
void sine_query_forward_kernel(const scalar_t* points, const scalar_t* scale, scalar_t* out,
                               int64_t rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rates = angle_rates<acc_t>(dim);
  const int64_t half = dim / 2, pairs = dim / 4;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* o = out + r * dim;
      const scalar_t* s = scale ? scale + r * dim : nullptr;
      for (int axis = 0; axis < 2; ++axis) {
        // y fills the first half, x the second
        const acc_t p = static_cast<acc_t>(points[r * 2 + (axis == 0 ? 1 : 0)]);
        const int64_t base = axis * half;
        for (int64_t i = 0; i < pairs; ++i) {
          const acc_t angle = p * rates[i];
          acc_t sin_v = std::sin(angle), cos_v = std::cos(angle);
          if (s) {
            sin_v *= static_cast<acc_t>(s[base + 2 * i]);
            cos_v *= static_cast<acc_t>(s[base + 2 * i + 1]);
          }
          o[base + 2 * i] = static_cast<scalar_t>(sin_v);
          o[base + 2 * i + 1] = static_cast<scalar_t>(cos_v);
        }
      }
    }
  });
}

template <typename scalar_t>
void sine_query_backward_kernel(const scalar_t* grad, const scalar_t* points,
                                const scalar_t* scale, scalar_t* grad_points,
                                scalar_t* grad_scale, int64_t rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto rates = angle_rates<acc_t>(dim);
  const int64_t half = dim / 2, pairs = dim / 4;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = grad + r * dim;
      const scalar_t* s = scale ? scale + r * dim : nullptr;
      for (int axis = 0; axis < 2; ++axis) {
        const int coord = axis == 0 ? 1 : 0;
        const acc_t p = static_cast<acc_t>(points[r * 2 + coord]);
        const int64_t base = axis * half;
        acc_t d_point = 0;
        for (int64_t i = 0; i < pairs; ++i) {
          const acc_t angle = p * rates[i];
          const acc_t sin_v = std::sin(angle), cos_v = std::cos(angle);
          acc_t g_sin = static_cast<acc_t>(g[base + 2 * i]);
          acc_t g_cos = static_cast<acc_t>(g[base + 2 * i + 1]);
          if (s) {
            grad_scale[r * dim + base + 2 * i] = static_cast<scalar_t>(g_sin * sin_v);
            grad_scale[r * dim + base + 2 * i + 1] = static_cast<scalar_t>(g_cos * cos_v);
            g_sin *= static_cast<acc_t>(s[base + 2 * i]);
            g_cos *= static_cast<acc_t>(s[base + 2 * i + 1]);
          }
          // d sin(a p)/dp = a cos(a p), d cos(a p)/dp = -a sin(a p)
          d_point += rates[i] * (g_sin * cos_v - g_cos * sin_v);
        }
        grad_points[r * 2 + coord] = static_cast<scalar_t>(d_point);
      }
    }
  });
}

}  // namespace

at::Tensor sine_query_cpu(const at::Tensor& reference_points,
                          const std::optional<at::Tensor>& query_scale, int64_t dim) {
  TORCH_CHECK(reference_points.device().is_cpu(), "sine_query_cpu: expected CPU tensors");
  auto q = prepare_sine_query(reference_points, query_scale, dim);
  if (q.rows == 0) return q.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.points.scalar_type(),
                                  "sine_query_cpu", [&] {
    sine_query_forward_kernel<scalar_t>(
        q.points.data_ptr<scalar_t>(), q.scale.defined() ? q.scale.data_ptr<scalar_t>() : nullptr,
        q.out.data_ptr<scalar_t>(), q.rows, dim);
  });
  return q.out;
}

std::tuple<at::Tensor, at::Tensor> sine_query_backward_cpu(
    const at::Tensor& grad, const at::Tensor& reference_points,
    const std::optional<at::Tensor>& query_scale, int64_t dim) {
  TORCH_CHECK(reference_points.device().is_cpu(), "sine_query_backward_cpu: expected CPU tensors");
  auto q = prepare_sine_query_backward(grad, reference_points, query_scale, dim);
  if (q.rows == 0) return {q.grad_points, q.grad_scale};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.points.scalar_type(),
                                  "sine_query_backward_cpu", [&] {
    const bool scaled = q.scale.defined();
    sine_query_backward_kernel<scalar_t>(
        q.grad.data_ptr<scalar_t>(), q.points.data_ptr<scalar_t>(),
        scaled ? q.scale.data_ptr<scalar_t>() : nullptr, q.grad_points.data_ptr<scalar_t>(),
        scaled ? q.grad_scale.data_ptr<scalar_t>() : nullptr, q.rows, dim);
  });
  return {q.grad_points, q.grad_scale};
}

TORCH_LIBRARY_IMPL(conditional_detr, CPU, m) {
  m.impl("conditional_spatial_query", &sine_query_cpu);
  m.impl("_conditional_spatial_query_backward", &sine_query_backward_cpu);
}

}  // namespace conditional_detr
