// CPU kernels of multi-scale deformable attention (Deformable DETR's MSDeformAttn core):
//   out[n, q, m, :] = sum over levels l and points p of
//       attention_weights[n, q, m, l, p] * bilinear(value[n, level l, m, :], location)
//
// The forward pass runs tasks of (batch element, head, block of queries), in that order, so that
// a thread stays on one head's slice of the value maps; per query it lists the corners that fall
// inside the maps, with their bilinear and attention weights folded together, then sums their
// channel rows in vector registers. The backward pass runs one task per (batch element, level,
// group of heads): every query samples every level, so the tasks are equal in work, and each
// writes its own slice of grad_value, so no atomics and no per-thread copies of grad_value are
// needed.
// fp16/bf16 inputs are widened to fp32 once and computed in fp32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common.h"
#include "vector.h"

namespace conditional_detr {
namespace {

// Channel loops are compiled per instruction set level (vector.h).

// out[c] = sum_k weights[k] * rows[offsets[k] + c] for c < kVecs vectors, kept in registers for
// the whole sum.
template <typename T, int kVecs>
CDETR_ALWAYS_INLINE void weighted_rows_block(const T* rows, const int64_t* offsets,
                                             const T* weights, int64_t count, T* out) {
  using V = typename Vec32<T>::type;
  constexpr int kLanes = Vec32<T>::kLanes;
  V acc[kVecs];
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) acc[v] = V{};
  for (int64_t k = 0; k < count; ++k) {
    const T* row = rows + offsets[k];
    const T w = weights[k];
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      V x;
      load_vec(x, row + v * kLanes);
      acc[v] += w * x;
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < kVecs; ++v) store_vec(out + v * kLanes, acc[v]);
}

template <typename T>
CDETR_ALWAYS_INLINE void weighted_rows_body(const T* rows, const int64_t* offsets,
                                            const T* weights, int64_t count, int64_t channels,
                                            T* out) {
  constexpr int kLanes = Vec32<T>::kLanes;
  int64_t c = 0;
  for (; c + 4 * kLanes <= channels; c += 4 * kLanes) {
    weighted_rows_block<T, 4>(rows + c, offsets, weights, count, out + c);
  }
  for (; c + kLanes <= channels; c += kLanes) {
    weighted_rows_block<T, 1>(rows + c, offsets, weights, count, out + c);
  }
  for (; c < channels; ++c) {
    T sum = 0;
    for (int64_t k = 0; k < count; ++k) sum += weights[k] * rows[offsets[k] + c];
    out[c] = sum;
  }
}

CDETR_VECTOR_LEVELS(void, weighted_rows, weighted_rows_body<float>,
                    (const float* rows, const int64_t* offsets, const float* weights, int64_t count, int64_t channels, float* out),
                    (rows, offsets, weights, count, channels, out))

void weighted_rows(const double* rows, const int64_t* offsets, const double* weights,
                   int64_t count, int64_t channels, double* out) {
  weighted_rows_body<double>(rows, offsets, weights, count, channels, out);
}

// One sample's backward over its four corner rows r[k] (zeros for corners outside the map):
// dots[k] = g . r[k], and grad_rows[k] += scales[k] g (a scratch row for corners outside).
template <typename T>
CDETR_ALWAYS_INLINE void corner_backward_body(const T* g, const T* const* r, T* const* grad_rows,
                                              const T* scales, int64_t channels, T* dots) {
  using V = typename Vec32<T>::type;
  constexpr int kLanes = Vec32<T>::kLanes;
  // local copies: the stores below (memcpy, which may alias anything) would otherwise make the
  // compiler reload the pointers and scales from the caller's arrays at every step
  const T* rows[4] = {r[0], r[1], r[2], r[3]};
  T* grads[4] = {grad_rows[0], grad_rows[1], grad_rows[2], grad_rows[3]};
  const T scale[4] = {scales[0], scales[1], scales[2], scales[3]};
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    V gv;
    load_vec(gv, g + c);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      V x, dx;
      load_vec(x, rows[k] + c);
      acc[k] += gv * x;
      load_vec(dx, grads[k] + c);
      dx += scale[k] * gv;
      store_vec(grads[k] + c, dx);
    }
  }
  for (int k = 0; k < 4; ++k) {
    T sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += acc[k][l];
    for (int64_t t = c; t < channels; ++t) {
      sum += g[t] * rows[k][t];
      grads[k][t] += scale[k] * g[t];
    }
    dots[k] = sum;
  }
}

CDETR_VECTOR_LEVELS(void, corner_backward, corner_backward_body<float>,
                    (const float* g, const float* const* r, float* const* grad_rows, const float* scales, int64_t channels, float* dots),
                    (g, r, grad_rows, scales, channels, dots))

void corner_backward(const double* g, const double* const* r, double* const* grad_rows,
                     const double* scales, int64_t channels, double* dots) {
  corner_backward_body<double>(g, r, grad_rows, scales, channels, dots);
}

constexpr int64_t kQueryBlock = 64;

struct Levels {
  std::vector<int> height, width;
  std::vector<int64_t> start;
};

Levels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index) {
  const int64_t L = spatial_shapes.size(0);
  const int64_t* shapes = spatial_shapes.const_data_ptr<int64_t>();
  const int64_t* starts = level_start_index.const_data_ptr<int64_t>();
  Levels levels;
  for (int64_t l = 0; l < L; ++l) {
    levels.height.push_back(static_cast<int>(shapes[2 * l]));
    levels.width.push_back(static_cast<int>(shapes[2 * l + 1]));
    levels.start.push_back(starts[l]);
  }
  return levels;
}

template <typename T>
void forward_kernel(const DeformableAttentionShape& s, const Levels& levels, const T* value,
                    const T* locations, const T* weights, T* out) {
  const int64_t M = s.num_heads, C = s.channels, L = s.num_levels, P = s.num_points;
  const int64_t Lq = s.num_queries, pixel_stride = M * C;
  const int64_t query_blocks = (Lq + kQueryBlock - 1) / kQueryBlock;
  at::parallel_for(0, s.batch * M * query_blocks, 1, [&](int64_t begin, int64_t end) {
    // the corners of one query's samples inside the maps: row offsets and combined weights
    std::vector<int64_t> offsets(4 * L * P);
    std::vector<T> corner_weights(4 * L * P);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % query_blocks, nm = task / query_blocks;
      const int64_t n = nm / M, m = nm % M;
      const T* head_value = value + n * s.num_values * pixel_stride + m * C;
      const int64_t q_end = std::min(Lq, (qb + 1) * kQueryBlock);
      for (int64_t q = qb * kQueryBlock; q < q_end; ++q) {
        const int64_t row = (n * Lq + q) * M + m;  // (n, q, m)
        const T* loc = locations + row * L * P * 2;
        const T* w = weights + row * L * P;
        int64_t count = 0;
        for (int64_t l = 0; l < L; ++l) {
          for (int64_t p = 0; p < P; ++p) {
            const int64_t lp = l * P + p;
            const auto sample = bilinear_sample<T>(loc[2 * lp], loc[2 * lp + 1],
                                                   levels.height[l], levels.width[l]);
            for (int k = 0; k < 4; ++k) {
              if (sample.index[k] < 0) continue;
              offsets[count] = (levels.start[l] + sample.index[k]) * pixel_stride;
              corner_weights[count] = w[lp] * sample.weight[k];
              ++count;
            }
          }
        }
        weighted_rows(head_value, offsets.data(), corner_weights.data(), count, C,
                      out + row * C);
      }
    }
  });
}

// One sample's backward: grad_value rows of its corners (inside the map) += the combined
// weight times g, and the gradients of its location and attention weight.
template <typename T>
CDETR_ALWAYS_INLINE void backward_sample(const T* g, const T* level_value, T* level_grad,
                                         int64_t pixel_stride, int height, int width,
                                         int64_t channels, const T* location, T weight,
                                         T* grad_location, T* grad_weight, const T* zeros,
                                         T* scratch) {
  const auto sample = bilinear_sample<T>(location[0], location[1], height, width);
  const T* rows[4];
  T* grad_rows[4];
  T scales[4];
  bool any = false;
  for (int k = 0; k < 4; ++k) {
    const bool inside = sample.index[k] >= 0;
    any |= inside;
    rows[k] = inside ? level_value + sample.index[k] * pixel_stride : zeros;
    grad_rows[k] = inside ? level_grad + sample.index[k] * pixel_stride : scratch;
    scales[k] = weight * sample.weight[k];
  }
  T dots[4] = {0, 0, 0, 0};
  if (any) corner_backward(g, rows, grad_rows, scales, channels, dots);
  // d(out . g)/dw is the sample itself; the location gradient is that of bilinear
  // interpolation, scaled by the map size (x reads pixel x * width - 0.5)
  const T fx = sample.fx, fy = sample.fy;
  *grad_weight = sample.weight[0] * dots[0] + sample.weight[1] * dots[1] +
                 sample.weight[2] * dots[2] + sample.weight[3] * dots[3];
  grad_location[0] = weight * width * ((1 - fy) * (dots[1] - dots[0]) + fy * (dots[3] - dots[2]));
  grad_location[1] = weight * height * ((1 - fx) * (dots[2] - dots[0]) + fx * (dots[3] - dots[1]));
}

template <typename T>
void backward_kernel(const DeformableAttentionShape& s, const Levels& levels, const T* grad_out,
                     const T* value, const T* locations, const T* weights, T* grad_value,
                     T* grad_locations, T* grad_weights) {
  const int64_t M = s.num_heads, C = s.channels, L = s.num_levels, P = s.num_points;
  const int64_t Lq = s.num_queries, pixel_stride = M * C;
  // Task (n, l, group of heads) reads and writes only level l of those heads of batch element
  // n. Groups are as wide as the thread count allows: a query's heads sit side by side in
  // memory, so wide groups stream through the locations, weights and grad_output (one head per
  // task made the backward several times slower).
  const int64_t wanted_tasks = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t groups =
      std::min(M, std::max<int64_t>(1, (wanted_tasks + s.batch * L - 1) / (s.batch * L)));
  const int64_t heads_per_group = (M + groups - 1) / groups;
  at::parallel_for(0, s.batch * L * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> zeros(C, T(0)), scratch(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t group = task % groups, nl = task / groups;
      const int64_t n = nl / L, l = nl % L;
      const int64_t m_begin = group * heads_per_group;
      const int64_t m_end = std::min(M, m_begin + heads_per_group);
      const int64_t level_offset = (n * s.num_values + levels.start[l]) * pixel_stride;
      for (int64_t q = 0; q < Lq; ++q) {
        for (int64_t m = m_begin; m < m_end; ++m) {
          const int64_t row = (n * Lq + q) * M + m;  // (n, q, m)
          for (int64_t p = 0; p < P; ++p) {
            const int64_t sample = row * L * P + l * P + p;  // (n, q, m, l, p)
            backward_sample(grad_out + row * C, value + level_offset + m * C,
                            grad_value + level_offset + m * C, pixel_stride, levels.height[l],
                            levels.width[l], C, locations + 2 * sample, weights[sample],
                            grad_locations + 2 * sample, grad_weights + sample, zeros.data(),
                            scratch.data());
          }
        }
      }
    }
  });
}

bool is_half(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

}  // namespace

at::Tensor multi_scale_deformable_attention_cpu(const at::Tensor& value,
                                                const at::Tensor& spatial_shapes,
                                                const at::Tensor& level_start_index,
                                                const at::Tensor& sampling_locations,
                                                const at::Tensor& attention_weights) {
  auto in = prepare_deformable_attention(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights);
  TORCH_CHECK(value.device().is_cpu(),
              "multi_scale_deformable_attention_cpu: expected CPU tensors");
  if (in.out.numel() == 0) return in.out;
  const auto levels = read_levels(in.spatial_shapes, in.level_start_index);
  const auto dtype = value.scalar_type();
  // fp16/bf16: computed in fp32 on widened copies
  const auto compute_dtype = is_half(dtype) ? at::kFloat : dtype;
  const auto v = in.value.to(compute_dtype), loc = in.sampling_locations.to(compute_dtype);
  const auto w = in.attention_weights.to(compute_dtype);
  auto out = is_half(dtype) ? at::empty(in.out.sizes(), in.out.options().dtype(at::kFloat))
                            : in.out;
  AT_DISPATCH_FLOATING_TYPES(compute_dtype, "multi_scale_deformable_attention_cpu", [&] {
    forward_kernel<scalar_t>(in.shape, levels, v.const_data_ptr<scalar_t>(),
                             loc.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>());
  });
  if (is_half(dtype)) in.out.copy_(out);
  return in.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_scale_deformable_attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  auto in = prepare_deformable_attention_backward(grad_output, value, spatial_shapes,
                                                  level_start_index, sampling_locations,
                                                  attention_weights);
  TORCH_CHECK(value.device().is_cpu(),
              "multi_scale_deformable_attention_backward_cpu: expected CPU tensors");
  if (!in.has_work) return in.grads();
  const auto levels = read_levels(in.spatial_shapes, in.level_start_index);
  const auto dtype = value.scalar_type();
  const bool half = is_half(dtype);
  const auto compute_dtype = half ? at::kFloat : dtype;
  const auto g = in.grad_output.to(compute_dtype), v = in.value.to(compute_dtype);
  const auto loc = in.sampling_locations.to(compute_dtype);
  const auto w = in.attention_weights.to(compute_dtype);
  // fp16/bf16: gradients accumulated in fp32 buffers, rounded once at the end
  const auto fp32 = in.grad_value.options().dtype(at::kFloat);
  auto grad_value = half ? at::zeros(in.grad_value.sizes(), fp32) : in.grad_value;
  auto grad_loc = half ? at::empty(in.grad_sampling_locations.sizes(), fp32)
                       : in.grad_sampling_locations;
  auto grad_w = half ? at::empty(in.grad_attention_weights.sizes(), fp32)
                     : in.grad_attention_weights;
  AT_DISPATCH_FLOATING_TYPES(compute_dtype, "multi_scale_deformable_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(in.shape, levels, g.const_data_ptr<scalar_t>(),
                              v.const_data_ptr<scalar_t>(), loc.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), grad_value.data_ptr<scalar_t>(),
                              grad_loc.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>());
  });
  if (half) {
    in.grad_value.copy_(grad_value);
    in.grad_sampling_locations.copy_(grad_loc);
    in.grad_attention_weights.copy_(grad_w);
  }
  return in.grads();
}

TORCH_LIBRARY_IMPL(conditional_detr, CPU, m) {
  m.impl("multi_scale_deformable_attention", &multi_scale_deformable_attention_cpu);
  m.impl("_multi_scale_deformable_attention_backward",
         &multi_scale_deformable_attention_backward_cpu);
}

}  // namespace conditional_detr
