// Operator schemas of the conditional_detr library and the input checks and allocations shared
// by every backend. Kernels register themselves per device in cpu/ and cuda/; fake (meta)
// kernels and autograd formulas are registered from Python in conditional_detr/ops/_extension.py.
#include <Python.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/vector.h"

#ifdef WITH_CUDA
#include <cuda.h>
#endif

// Importing conditional_detr._C loads this library, which runs the registrations below; the
// module itself exposes nothing, every entry point is a torch.ops.conditional_detr operator.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace conditional_detr {

AttentionShape check_attention_inputs(
    const at::Tensor& q_content, const at::Tensor& q_spatial, const at::Tensor& k_content,
    const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, int64_t num_heads) {
  const at::Tensor* tensors[] = {&q_content, &q_spatial, &k_content, &k_spatial, &value};
  const char* names[] = {"q_content", "q_spatial", "k_content", "k_spatial", "value"};
  for (int i = 0; i < 5; ++i) {
    TORCH_CHECK(tensors[i]->dim() == 3, "conditional_cross_attention: ", names[i],
                " must be [length, batch, channels], got shape ", tensors[i]->sizes());
    TORCH_CHECK(tensors[i]->device() == q_content.device(), "conditional_cross_attention: ", names[i],
                " is on ", tensors[i]->device(), " but q_content is on ", q_content.device());
    TORCH_CHECK(tensors[i]->scalar_type() == q_content.scalar_type(), "conditional_cross_attention: ",
                names[i], " has dtype ", tensors[i]->scalar_type(), " but q_content has ",
                q_content.scalar_type());
  }
  const auto dtype = q_content.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "conditional_cross_attention: expected float32, float64, float16 or bfloat16 inputs, got ",
              dtype);
  TORCH_CHECK(num_heads > 0, "conditional_cross_attention: num_heads must be positive, got ", num_heads);
  TORCH_CHECK(q_spatial.sizes() == q_content.sizes(),
              "conditional_cross_attention: q_spatial ", q_spatial.sizes(), " must match q_content ",
              q_content.sizes());
  TORCH_CHECK(k_spatial.sizes() == k_content.sizes(),
              "conditional_cross_attention: k_spatial ", k_spatial.sizes(), " must match k_content ",
              k_content.sizes());
  AttentionShape shape;
  shape.num_queries = q_content.size(0);
  shape.batch = q_content.size(1);
  shape.num_keys = k_content.size(0);
  shape.num_heads = num_heads;
  TORCH_CHECK(k_content.size(1) == shape.batch && value.size(1) == shape.batch,
              "conditional_cross_attention: batch sizes differ: queries ", shape.batch, ", keys ",
              k_content.size(1), ", value ", value.size(1));
  TORCH_CHECK(k_content.size(2) == q_content.size(2),
              "conditional_cross_attention: query channels ", q_content.size(2),
              " differ from key channels ", k_content.size(2));
  TORCH_CHECK(value.size(0) == shape.num_keys, "conditional_cross_attention: value has ", value.size(0),
              " keys, k_content has ", shape.num_keys);
  TORCH_CHECK(q_content.size(2) % num_heads == 0 && value.size(2) % num_heads == 0,
              "conditional_cross_attention: channels (", q_content.size(2), " query/key, ",
              value.size(2), " value) must be divisible by num_heads=", num_heads);
  shape.head_dim = q_content.size(2) / num_heads;
  shape.value_head_dim = value.size(2) / num_heads;
  if (key_padding_mask.has_value()) {
    const auto& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, "conditional_cross_attention: key_padding_mask must be ",
                "bool (True = padding), got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == shape.batch && mask.size(1) == shape.num_keys,
                "conditional_cross_attention: key_padding_mask must be [batch, num_keys] = [",
                shape.batch, ", ", shape.num_keys, "], got ", mask.sizes());
    TORCH_CHECK(mask.device() == q_content.device(), "conditional_cross_attention: key_padding_mask is on ",
                mask.device(), " but the inputs are on ", q_content.device());
  }
  return shape;
}

AttentionShape check_attention_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& q_content, const at::Tensor& q_spatial,
    const at::Tensor& k_content, const at::Tensor& k_spatial, const at::Tensor& value,
    const std::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, int64_t num_heads) {
  const auto shape = check_attention_inputs(q_content, q_spatial, k_content, k_spatial, value,
                                            key_padding_mask, num_heads);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == shape.num_queries &&
                  out.size(1) == shape.batch && out.size(2) == value.size(2),
              "conditional_cross_attention backward: grad_out ", grad_out.sizes(), " and out ",
              out.sizes(), " must be [num_queries, batch, value channels]");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == shape.batch && lse.size(1) == num_heads &&
                  lse.size(2) == shape.num_queries,
              "conditional_cross_attention backward: lse must be [batch, heads, queries], got ",
              lse.sizes());
  return shape;
}

void check_sine_query_inputs(const at::Tensor& reference_points,
                             const std::optional<at::Tensor>& query_scale, int64_t dim) {
  TORCH_CHECK(dim > 0 && dim % 4 == 0,
              "conditional_spatial_query: dim must be a positive multiple of 4, got ", dim);
  TORCH_CHECK(reference_points.dim() >= 1 && reference_points.size(-1) == 2,
              "conditional_spatial_query: reference_points must be [..., 2], got ",
              reference_points.sizes());
  TORCH_CHECK(at::isFloatingType(reference_points.scalar_type()),
              "conditional_spatial_query: reference_points must be floating point, got ",
              reference_points.scalar_type());
  if (query_scale.has_value()) {
    const auto& scale = *query_scale;
    auto expected = reference_points.sizes().vec();
    expected.back() = dim;
    TORCH_CHECK(scale.sizes().vec() == expected, "conditional_spatial_query: query_scale must be ",
                at::IntArrayRef(expected), ", got ", scale.sizes());
    TORCH_CHECK(scale.scalar_type() == reference_points.scalar_type(),
                "conditional_spatial_query: query_scale has dtype ", scale.scalar_type(),
                " but reference_points has ", reference_points.scalar_type());
    TORCH_CHECK(scale.device() == reference_points.device(),
                "conditional_spatial_query: query_scale is on ", scale.device(),
                " but reference_points is on ", reference_points.device());
  }
}

std::tuple<at::Tensor, at::Tensor> allocate_attention_outputs(const at::Tensor& q_content,
                                                              const at::Tensor& value,
                                                              const AttentionShape& shape) {
  auto out = at::empty({shape.num_queries, shape.batch, value.size(2)}, q_content.options());
  auto lse = at::empty({shape.batch, shape.num_heads, shape.num_queries},
                       q_content.options().dtype(lse_dtype_for(q_content.scalar_type())));
  if (out.numel() == 0) lse.fill_(std::numeric_limits<double>::infinity());
  return {out, lse};
}

AttentionGrads allocate_attention_grads(const at::Tensor& q_content, const at::Tensor& q_spatial,
                                        const at::Tensor& k_content, const at::Tensor& k_spatial,
                                        const at::Tensor& value, const at::Tensor& out,
                                        const AttentionShape& shape) {
  AttentionGrads grads{at::empty(q_content.sizes(), q_content.options()),
                       at::empty(q_spatial.sizes(), q_spatial.options()),
                       at::empty(k_content.sizes(), k_content.options()),
                       at::empty(k_spatial.sizes(), k_spatial.options()),
                       at::empty(value.sizes(), value.options()),
                       out.numel() > 0 && shape.num_keys > 0};
  if (!grads.has_work) {
    for (auto* g : {&grads.q_content, &grads.q_spatial, &grads.k_content, &grads.k_spatial,
                    &grads.value}) {
      g->zero_();
    }
  }
  return grads;
}

SineQueryForward prepare_sine_query(const at::Tensor& reference_points,
                                    const std::optional<at::Tensor>& query_scale, int64_t dim) {
  check_sine_query_inputs(reference_points, query_scale, dim);
  SineQueryForward prepared;
  prepared.points = reference_points.contiguous();
  prepared.scale = contiguous_or_undefined(query_scale);
  auto out_sizes = reference_points.sizes().vec();
  out_sizes.back() = dim;
  prepared.out = at::empty(out_sizes, prepared.points.options());
  prepared.rows = prepared.points.numel() / 2;
  return prepared;
}

SineQueryBackward prepare_sine_query_backward(const at::Tensor& grad,
                                              const at::Tensor& reference_points,
                                              const std::optional<at::Tensor>& query_scale,
                                              int64_t dim) {
  check_sine_query_inputs(reference_points, query_scale, dim);
  SineQueryBackward prepared;
  prepared.points = reference_points.contiguous();
  prepared.scale = contiguous_or_undefined(query_scale);
  prepared.grad = grad.contiguous().to(prepared.points.scalar_type());
  prepared.grad_points = at::empty_like(prepared.points);
  prepared.grad_scale = prepared.scale.defined() ? at::empty_like(prepared.scale)
                                                 : at::empty({0}, prepared.points.options());
  prepared.rows = prepared.points.numel() / 2;
  return prepared;
}

DeformableAttentionShape check_deformable_attention_inputs(const at::Tensor& value,
                                                           const at::Tensor& spatial_shapes,
                                                           const at::Tensor& level_start_index,
                                                           const at::Tensor& sampling_locations,
                                                           const at::Tensor& attention_weights) {
  constexpr const char* op = "multi_scale_deformable_attention: ";
  TORCH_CHECK(value.dim() == 4, op, "value must be [batch, values, heads, channels], got shape ",
              value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2, op,
              "sampling_locations must be [batch, queries, heads, levels, points, 2], got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              "spatial_shapes must be [levels, 2] (height, width), got shape ",
              spatial_shapes.sizes());
  DeformableAttentionShape shape;
  shape.batch = value.size(0);
  shape.num_values = value.size(1);
  shape.num_heads = value.size(2);
  shape.channels = value.size(3);
  shape.num_queries = sampling_locations.size(1);
  shape.num_levels = spatial_shapes.size(0);
  shape.num_points = sampling_locations.size(4);
  const std::vector<int64_t> expected_locations = {shape.batch,      shape.num_queries,
                                                   shape.num_heads,  shape.num_levels,
                                                   shape.num_points, 2};
  const at::IntArrayRef expected_weights = at::IntArrayRef(expected_locations).slice(0, 5);
  TORCH_CHECK(sampling_locations.sizes() == at::IntArrayRef(expected_locations), op,
              "sampling_locations must be [batch, queries, heads, levels, points, 2] = ",
              at::IntArrayRef(expected_locations),
              " (batch and heads of value, levels of spatial_shapes), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.sizes() == expected_weights, op,
              "attention_weights must be [batch, queries, heads, levels, points] = ",
              expected_weights, ", got ", attention_weights.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == shape.num_levels, op,
              "level_start_index must be [levels] = [", shape.num_levels, "], got shape ",
              level_start_index.sizes());

  const at::Tensor* tensors[] = {&spatial_shapes, &level_start_index, &sampling_locations,
                                 &attention_weights};
  const char* names[] = {"spatial_shapes", "level_start_index", "sampling_locations",
                         "attention_weights"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(tensors[i]->device() == value.device(), op, names[i], " is on ",
                tensors[i]->device(), " but value is on ", value.device());
  }
  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, "value must be float32, float64, float16 or bfloat16, got ", dtype);
  for (int i = 2; i < 4; ++i) {
    TORCH_CHECK(tensors[i]->scalar_type() == dtype, op, names[i], " has dtype ",
                tensors[i]->scalar_type(), " but value has ", dtype);
  }
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(tensors[i]->scalar_type() == at::kLong, op, names[i], " must be int64, got ",
                tensors[i]->scalar_type());
  }
  // the kernels index a level's pixels and a batch element's values with 32-bit ints
  TORCH_CHECK(shape.num_values < (1ll << 31), op, "value has ", shape.num_values,
              " values per batch element, more than the kernels' 32-bit index range");
  if (value.device().is_cpu()) {
    // reading the levels of a GPU tensor would synchronize with the device: checked on CPU only
    const auto shapes = spatial_shapes.contiguous(), starts = level_start_index.contiguous();
    const int64_t* hw = shapes.const_data_ptr<int64_t>();
    const int64_t* start = starts.const_data_ptr<int64_t>();
    int64_t total = 0;
    for (int64_t l = 0; l < shape.num_levels; ++l) {
      TORCH_CHECK(hw[2 * l] >= 0 && hw[2 * l + 1] >= 0, op, "spatial_shapes[", l, "] = (",
                  hw[2 * l], ", ", hw[2 * l + 1], ") must not be negative");
      TORCH_CHECK(start[l] == total, op, "level_start_index[", l, "] is ", start[l],
                  " but the levels before it hold ", total, " values");
      total += hw[2 * l] * hw[2 * l + 1];
    }
    TORCH_CHECK(total == shape.num_values, op, "spatial_shapes hold ", total,
                " values (sum of height * width) but value has ", shape.num_values);
  }
  return shape;
}

DeformableAttentionForward prepare_deformable_attention(const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
  DeformableAttentionForward prepared;
  prepared.shape = check_deformable_attention_inputs(value, spatial_shapes, level_start_index,
                                                     sampling_locations, attention_weights);
  const auto& s = prepared.shape;
  prepared.value = value.contiguous();
  prepared.spatial_shapes = spatial_shapes.contiguous();
  prepared.level_start_index = level_start_index.contiguous();
  prepared.sampling_locations = sampling_locations.contiguous();
  prepared.attention_weights = attention_weights.contiguous();
  prepared.out = at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  // no level or point: every output is an empty sum
  if (s.num_levels == 0 || s.num_points == 0) prepared.out.zero_();
  return prepared;
}

DeformableAttentionBackward prepare_deformable_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  DeformableAttentionBackward prepared;
  prepared.shape = check_deformable_attention_inputs(value, spatial_shapes, level_start_index,
                                                     sampling_locations, attention_weights);
  const auto& s = prepared.shape;
  const std::vector<int64_t> out_sizes = {s.batch, s.num_queries, s.num_heads * s.channels};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_sizes),
              "multi_scale_deformable_attention backward: grad_output must be [batch, queries, "
              "heads * channels] = ", at::IntArrayRef(out_sizes), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value.device(),
              "multi_scale_deformable_attention backward: grad_output is on ",
              grad_output.device(), " but value is on ", value.device());
  prepared.grad_output = grad_output.to(value.scalar_type()).contiguous();
  prepared.value = value.contiguous();
  prepared.spatial_shapes = spatial_shapes.contiguous();
  prepared.level_start_index = level_start_index.contiguous();
  prepared.sampling_locations = sampling_locations.contiguous();
  prepared.attention_weights = attention_weights.contiguous();
  prepared.grad_value = at::zeros(value.sizes(), value.options());
  prepared.grad_sampling_locations = at::empty(sampling_locations.sizes(), value.options());
  prepared.grad_attention_weights = at::empty(attention_weights.sizes(), value.options());
  prepared.has_work = grad_output.numel() > 0 && sampling_locations.numel() > 0;
  if (!prepared.has_work) {
    prepared.grad_sampling_locations.zero_();
    prepared.grad_attention_weights.zero_();
  }
  return prepared;
}

DropoutForward prepare_dropout(const at::Tensor& input, double p, const at::Tensor& rng_state) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "conditional_detr::dropout: input must be floating point, got ", input.scalar_type());
  TORCH_CHECK(p >= 0.0, "conditional_detr::dropout: p must be in [0, 1), got ", p);
  DropoutForward prepared;
  prepared.params = make_dropout_params(p, rng_state);
  prepared.input = input.contiguous();
  prepared.out = at::empty(input.sizes(), prepared.input.options());
  return prepared;
}

// The CUDA runtime version the extension was compiled against, -1 without CUDA; lets Python
// explain a mismatch with torch's own CUDA instead of failing at the first kernel launch.
static int64_t cuda_version() {
#ifdef WITH_CUDA
  return CUDA_VERSION;
#else
  return -1;
#endif
}

// The instruction set level the CPU kernels' vector loops run at (cpu/vector.h).
static std::string cpu_vector_level() { return vector_level_name(vector_level()); }

TORCH_LIBRARY(conditional_detr, m) {
  // λq ⊙ sinusoidal(reference points); query_scale None means λq = 1 (first decoder layer).
  m.def("conditional_spatial_query(Tensor reference_points, Tensor? query_scale, int dim) -> Tensor");
  // Returns (grad_reference_points, grad_query_scale); the latter is empty without query_scale.
  m.def(
      "_conditional_spatial_query_backward(Tensor grad, Tensor reference_points, Tensor? query_scale, int dim)"
      " -> (Tensor, Tensor)");
  // Returns (output [Q, B, value channels], logsumexp [B, heads, Q] in fp32 (fp64 for fp64)).
  // rng_state is an int64 CPU tensor whose first element seeds the dropout hash.
  m.def(
      "conditional_cross_attention(Tensor q_content, Tensor q_spatial, Tensor k_content, Tensor k_spatial,"
      " Tensor value, Tensor? key_padding_mask, int num_heads, float dropout_p,"
      " Tensor? rng_state) -> (Tensor, Tensor)");
  // Returns the gradients of (q_content, q_spatial, k_content, k_spatial, value).
  m.def(
      "_conditional_cross_attention_backward(Tensor grad_out, Tensor q_content, Tensor q_spatial, Tensor k_content,"
      " Tensor k_spatial, Tensor value, Tensor? key_padding_mask, Tensor out, Tensor lse,"
      " int num_heads, float dropout_p, Tensor? rng_state)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Deformable DETR's multi-scale deformable attention core: value [N, S, heads, C],
  // spatial_shapes [L, 2] and level_start_index [L] int64, sampling_locations
  // [N, Lq, heads, L, P, 2] normalized (x, y), attention_weights [N, Lq, heads, L, P]; returns
  // [N, Lq, heads * C]. Bilinear sampling as grid_sample (align_corners=False, zero padding).
  m.def(
      "multi_scale_deformable_attention(Tensor value, Tensor spatial_shapes,"
      " Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  // Returns the gradients of (value, sampling_locations, attention_weights).
  m.def(
      "_multi_scale_deformable_attention_backward(Tensor grad_output, Tensor value,"
      " Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations,"
      " Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
  // input * keep / (1 - p), keep from the dropout hash of (rng_state[0], row-major element
  // index); its backward is the same op on the gradient with the same rng_state.
  m.def("dropout(Tensor input, float p, Tensor rng_state) -> Tensor");
  m.def("cuda_version() -> int", &cuda_version);
  m.def("cpu_vector_level() -> str", &cpu_vector_level);
}

}  // namespace conditional_detr
