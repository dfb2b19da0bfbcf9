// Shared declarations of the conditional_detr ops: kernel entry points, input checks and the
// counter-based dropout generator that CPU and CUDA kernels must agree on bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

#if defined(__CUDACC__)
#define CDETR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CDETR_HOST_DEVICE inline
#endif

namespace conditional_detr {

// Dropout keeps an attention weight when the hash of (seed, flat element index) is at or
// above `threshold`. Hashing the index (splitmix64's finalizer) instead of drawing from a
// stateful stream lets the backward pass, and every thread or tile, regenerate the same mask
// without storing it.
CDETR_HOST_DEVICE uint32_t dropout_hash(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 32);
}

struct DropoutParams {
  bool enabled = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep when hash >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)
};

inline DropoutParams make_dropout_params(double p, const std::optional<at::Tensor>& rng_state) {
  DropoutParams params;
  if (p <= 0.0) {
    return params;
  }
  TORCH_CHECK(p < 1.0, "conditional_detr: dropout_p must be in [0, 1), got ", p);
  TORCH_CHECK(rng_state.has_value() && rng_state->numel() >= 1,
              "conditional_detr: dropout_p > 0 needs an rng_state tensor holding the seed");
  TORCH_CHECK(rng_state->scalar_type() == at::kLong, "conditional_detr: rng_state must be int64");
  params.enabled = true;
  params.seed = static_cast<uint64_t>(rng_state->to(at::kCPU).data_ptr<int64_t>()[0]);
  params.threshold = static_cast<uint32_t>(std::min(p * 4294967296.0, 4294967295.0));
  params.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  return params;
}

// Sizes shared by every attention kernel: inputs are sequence-first [length, batch, channels]
// with per-head channel slices, as in the reference implementation.
struct AttentionShape {
  int64_t num_queries, num_keys, batch, num_heads;
  int64_t head_dim;        // per head, for each of the content and spatial parts
  int64_t value_head_dim;  // per head
};

AttentionShape check_attention_inputs(
    const at::Tensor& q_content, const at::Tensor& q_spatial, const at::Tensor& k_content,
    const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, int64_t num_heads);

// check_attention_inputs plus the shapes of what backward receives: grad_out and out
// [num_queries, batch, value channels], lse [batch, heads, queries]
AttentionShape check_attention_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_spatial,
    const at::Tensor& k_content, const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_heads);

void check_sine_query_inputs(const at::Tensor& reference_points,
                             const std::optional<at::Tensor>& query_scale, int64_t dim);

// What every device's kernels share around the math: checked, contiguous inputs and
// allocated outputs, so that the CPU and CUDA entry points differ only in the launch.

// An optional input made contiguous, or an undefined tensor when absent.
inline at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// The log-sum-exp is kept in fp32 (fp64 for fp64 inputs).
inline at::ScalarType lse_dtype_for(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// out [num_queries, batch, value channels] and lse [batch, heads, queries], uninitialized;
// with no query or no batch element, lse is +inf and there is nothing to compute.
std::tuple<at::Tensor, at::Tensor> allocate_attention_outputs(const at::Tensor& q_content,
                                                              const at::Tensor& value,
                                                              const AttentionShape& shape);

// Gradients shaped like the five inputs: zeros when there is no query, batch element or
// key (`has_work` false), else uninitialized for the kernel to fill.
struct AttentionGrads {
  at::Tensor q_content, q_spatial, k_content, k_spatial, value;
  bool has_work;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {q_content, q_spatial, k_content, k_spatial, value};
  }
};
AttentionGrads allocate_attention_grads(const at::Tensor& q_content, const at::Tensor& q_spatial,
                                        const at::Tensor& k_content, const at::Tensor& k_spatial,
                                        const at::Tensor& value, const at::Tensor& out,
                                        const AttentionShape& shape);

// conditional_spatial_query: checked contiguous inputs (scale undefined when absent), the allocated output,
// and the number of (x, y) points.
struct SineQueryForward {
  at::Tensor points, scale, out;
  int64_t rows;
};
SineQueryForward prepare_sine_query(const at::Tensor& reference_points,
                                    const std::optional<at::Tensor>& query_scale, int64_t dim);

// _conditional_spatial_query_backward: the same, with the incoming gradient in the points' dtype and the
// allocated input gradients (grad_scale is empty when there is no scale).
struct SineQueryBackward {
  at::Tensor grad, points, scale, grad_points, grad_scale;
  int64_t rows;
};
SineQueryBackward prepare_sine_query_backward(const at::Tensor& grad,
                                              const at::Tensor& reference_points,
                                              const std::optional<at::Tensor>& query_scale,
                                              int64_t dim);

// dropout: the checked input made contiguous (flat index = row-major element index, whatever
// the input's strides), the allocated contiguous output and the hash parameters.
struct DropoutForward {
  at::Tensor input, out;
  DropoutParams params;
};
DropoutForward prepare_dropout(const at::Tensor& input, double p, const at::Tensor& rng_state);

// Multi-scale deformable attention: value [N, S, heads, C] holds the L levels' [H, W] maps
// flattened and concatenated along S; each of Lq queries samples P points per level and head.
struct DeformableAttentionShape {
  int64_t batch, num_values, num_heads, channels, num_queries, num_levels, num_points;
};

// Checks devices, dtypes and shapes (and, for CPU tensors, that the levels tile S); throws with
// the offending argument named.
DeformableAttentionShape check_deformable_attention_inputs(const at::Tensor& value,
                                                           const at::Tensor& spatial_shapes,
                                                           const at::Tensor& level_start_index,
                                                           const at::Tensor& sampling_locations,
                                                           const at::Tensor& attention_weights);

// The checked inputs made contiguous and the allocated output [N, Lq, heads * C].
struct DeformableAttentionForward {
  at::Tensor value, spatial_shapes, level_start_index, sampling_locations, attention_weights;
  at::Tensor out;
  DeformableAttentionShape shape;
};
DeformableAttentionForward prepare_deformable_attention(const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights);

// The same for backward, with grad_output contiguous in the inputs' dtype; grad_value is zeroed
// (kernels accumulate into it), the other two gradients are uninitialized for the kernel to
// fill, or zeros when there is no query, batch element or point (`has_work` false).
struct DeformableAttentionBackward {
  at::Tensor grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights;
  at::Tensor grad_value, grad_sampling_locations, grad_attention_weights;
  DeformableAttentionShape shape;
  bool has_work;
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads() const {
    return {grad_value, grad_sampling_locations, grad_attention_weights};
  }
};
DeformableAttentionBackward prepare_deformable_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights);

// The four neighbours of one bilinear sample as grid_sample reads them (align_corners=False,
// zero padding): location (x, y) in [0, 1] is pixel coordinate (x W - 0.5, y H - 0.5). Corners
// in the order top-left, top-right, bottom-left, bottom-right; a corner outside the map has
// index -1 and weight 0 (it reads zero and takes no gradient). CPU and CUDA kernels share this
// so that they agree on every edge case.
template <typename acc_t>
struct BilinearSample {
  int index[4];     // y * W + x within the level, or -1
  acc_t weight[4];  // bilinear weights, 0 outside the map
  acc_t fx, fy;     // position between the corners, for the location gradient
};

template <typename acc_t>
CDETR_HOST_DEVICE BilinearSample<acc_t> bilinear_sample(acc_t loc_x, acc_t loc_y, int height,
                                                        int width) {
  BilinearSample<acc_t> s;
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  // some corner is inside exactly when x in [-1, W) and y in [-1, H); the test also rejects
  // NaN and coordinates too large for an int
  if (!(x >= acc_t(-1) && x < static_cast<acc_t>(width) && y >= acc_t(-1) &&
        y < static_cast<acc_t>(height))) {
    for (int k = 0; k < 4; ++k) {
      s.index[k] = -1;
      s.weight[k] = 0;
    }
    s.fx = s.fy = 0;
    return s;
  }
  // floor of a value in [-1, W): truncation, then one down for negative fractions
  int x0 = static_cast<int>(x), y0 = static_cast<int>(y);
  x0 -= static_cast<acc_t>(x0) > x;
  y0 -= static_cast<acc_t>(y0) > y;
  s.fx = x - static_cast<acc_t>(x0);
  s.fy = y - static_cast<acc_t>(y0);
  const bool left = x0 >= 0, right = x0 + 1 < width, top = y0 >= 0, bottom = y0 + 1 < height;
  const bool inside[4] = {top && left, top && right, bottom && left, bottom && right};
  const int index[4] = {y0 * width + x0, y0 * width + x0 + 1, (y0 + 1) * width + x0,
                        (y0 + 1) * width + x0 + 1};
  const acc_t weight[4] = {(1 - s.fx) * (1 - s.fy), s.fx * (1 - s.fy), (1 - s.fx) * s.fy,
                           s.fx * s.fy};
  for (int k = 0; k < 4; ++k) {
    s.index[k] = inside[k] ? index[k] : -1;
    s.weight[k] = inside[k] ? weight[k] : acc_t(0);
  }
  return s;
}

}  // namespace conditional_detr
