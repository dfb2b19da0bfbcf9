// CUDA kernels of multi-scale deformable attention; the math is described in
// ../cpu/ms_deform_attn_cpu.cpp and the bilinear sampling is common.h's bilinear_sample.
//
// Threads: a group of G consecutive lanes (a power of two, at most a warp) serves one
// (batch element, query, head); each lane owns V consecutive channels (a 16-byte pack: 4 fp32,
// 8 fp16/bf16, 2 fp64) and loads them with one vector load, or more packs when the head is
// wider than G packs. Accumulation is in fp32 (fp64 for fp64). The backward pass reduces each
// sample's location and weight gradients over the group with warp shuffles (no shared memory,
// no thread waiting on the others) and adds the value gradient with atomics: one float4 atomic
// per pack on sm_90, into an fp32 buffer for fp16/bf16 inputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace conditional_detr {
namespace {

constexpr int kThreads = 256;
constexpr int kPackBytes = 16;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V, typename acc_t>
__device__ __forceinline__ void load_pack(const T* p, acc_t (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<acc_t>(pack.v[i]);
}

template <typename T, int V, typename acc_t>
__device__ __forceinline__ void store_pack(T* p, const acc_t (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int i = 0; i < V; ++i) pack.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

// sm_90 adds float4 atomics to global memory: one instruction per 4 channels.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define CDETR_FLOAT4_ATOMICS 1
#else
#define CDETR_FLOAT4_ATOMICS 0
#endif

// dst[i] += scale * g[i] for the V channels of a pack.
template <int V, typename grad_t, typename acc_t>
__device__ __forceinline__ void atomic_add_pack(grad_t* dst, acc_t scale, const acc_t (&g)[V]) {
  if constexpr (CDETR_FLOAT4_ATOMICS && std::is_same_v<grad_t, float> && V % 4 == 0) {
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + i),
                make_float4(scale * g[i], scale * g[i + 1], scale * g[i + 2], scale * g[i + 3]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) atomicAdd(dst + i, static_cast<grad_t>(scale * g[i]));
  }
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x) {
#pragma unroll
  for (int offset = G / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <typename scalar_t, typename grad_t>
struct Params {
  const scalar_t* value;              // [N, S, M, C]
  const int64_t* spatial_shapes;      // [L, 2] (H, W)
  const int64_t* level_start_index;   // [L]
  const scalar_t* sampling_locations;  // [N, Lq, M, L, P, 2]
  const scalar_t* attention_weights;  // [N, Lq, M, L, P]
  scalar_t* out;                      // [N, Lq, M * C]
  // backward only
  const scalar_t* grad_out;           // [N, Lq, M * C]
  grad_t* grad_value;                 // [N, S, M, C], zeroed, accumulated with atomics
  scalar_t* grad_sampling_locations;
  scalar_t* grad_attention_weights;
  int64_t rows;  // N * Lq * M
  int S, M, C, Lq, L, P;
};

struct Level {
  int height, width;
  int64_t start;
};

__device__ __forceinline__ Level read_level(const int64_t* shapes, const int64_t* starts, int l) {
  return {static_cast<int>(__ldg(shapes + 2 * l)), static_cast<int>(__ldg(shapes + 2 * l + 1)),
          __ldg(starts + l)};
}

// Lanes [G row, G row + G) of the grid serve row (n, q, m); lane g owns packs g, g + G, ...
template <int V, int G, typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const Params<scalar_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = thread / G;
  const int lane = static_cast<int>(thread % G);
  if (row >= p.rows) return;
  const int m = static_cast<int>(row % p.M);
  const int64_t n = row / p.M / p.Lq;
  const int64_t pixel_stride = static_cast<int64_t>(p.M) * p.C;
  const scalar_t* head_value = p.value + n * p.S * pixel_stride + static_cast<int64_t>(m) * p.C;
  const scalar_t* loc = p.sampling_locations + row * p.L * p.P * 2;
  const scalar_t* weights = p.attention_weights + row * p.L * p.P;
  for (int c = lane * V; c < p.C; c += G * V) {
    acc_t acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0;
    for (int l = 0; l < p.L; ++l) {
      const Level level = read_level(p.spatial_shapes, p.level_start_index, l);
      const scalar_t* level_value = head_value + level.start * pixel_stride + c;
      for (int pt = 0; pt < p.P; ++pt) {
        const int lp = l * p.P + pt;
        const auto sample = bilinear_sample<acc_t>(static_cast<acc_t>(loc[2 * lp]),
                                                   static_cast<acc_t>(loc[2 * lp + 1]),
                                                   level.height, level.width);
        const acc_t w = static_cast<acc_t>(weights[lp]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (sample.index[k] < 0) continue;
          acc_t corner[V];
          load_pack<scalar_t, V>(level_value + sample.index[k] * pixel_stride, corner);
          const acc_t cw = w * sample.weight[k];
#pragma unroll
          for (int i = 0; i < V; ++i) acc[i] += cw * corner[i];
        }
      }
    }
    store_pack<scalar_t, V>(p.out + row * p.C + c, acc);
  }
}

// The same lanes as forward. Every lane runs every sample's shuffles (rows past the end
// included), so the reductions always see full groups.
template <int V, int G, typename scalar_t, typename grad_t>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const Params<scalar_t, grad_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = thread / G;
  const int lane = static_cast<int>(thread % G);
  const bool valid = row < p.rows;
  const int64_t safe_row = valid ? row : 0;
  const int m = static_cast<int>(safe_row % p.M);
  const int64_t n = safe_row / p.M / p.Lq;
  const int64_t pixel_stride = static_cast<int64_t>(p.M) * p.C;
  const int64_t head_offset = n * p.S * pixel_stride + static_cast<int64_t>(m) * p.C;
  const scalar_t* grad_out = p.grad_out + safe_row * p.C;
  const scalar_t* loc = p.sampling_locations + safe_row * p.L * p.P * 2;
  const scalar_t* weights = p.attention_weights + safe_row * p.L * p.P;
  for (int l = 0; l < p.L; ++l) {
    const Level level = read_level(p.spatial_shapes, p.level_start_index, l);
    const int64_t level_offset = head_offset + level.start * pixel_stride;
    for (int pt = 0; pt < p.P; ++pt) {
      const int lp = l * p.P + pt;
      const auto sample = bilinear_sample<acc_t>(static_cast<acc_t>(loc[2 * lp]),
                                                 static_cast<acc_t>(loc[2 * lp + 1]),
                                                 level.height, level.width);
      const acc_t w = static_cast<acc_t>(weights[lp]);
      // dots[k]: this lane's part of grad_out . corner k
      acc_t dots[4] = {0, 0, 0, 0};
      for (int c = lane * V; valid && c < p.C; c += G * V) {
        acc_t g[V];
        load_pack<scalar_t, V>(grad_out + c, g);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (sample.index[k] < 0) continue;
          const int64_t offset = level_offset + sample.index[k] * pixel_stride + c;
          acc_t corner[V];
          load_pack<scalar_t, V>(p.value + offset, corner);
#pragma unroll
          for (int i = 0; i < V; ++i) dots[k] += g[i] * corner[i];
          atomic_add_pack<V>(p.grad_value + offset, w * sample.weight[k], g);
        }
      }
      const acc_t fx = sample.fx, fy = sample.fy;
      acc_t grad_w = sample.weight[0] * dots[0] + sample.weight[1] * dots[1] +
                     sample.weight[2] * dots[2] + sample.weight[3] * dots[3];
      acc_t grad_x = (1 - fy) * (dots[1] - dots[0]) + fy * (dots[3] - dots[2]);
      acc_t grad_y = (1 - fx) * (dots[2] - dots[0]) + fx * (dots[3] - dots[1]);
      grad_w = group_sum<G>(grad_w);
      grad_x = group_sum<G>(grad_x);
      grad_y = group_sum<G>(grad_y);
      if (valid && lane == 0) {
        const int64_t s = safe_row * p.L * p.P + lp;
        p.grad_attention_weights[s] = static_cast<scalar_t>(grad_w);
        p.grad_sampling_locations[2 * s] = static_cast<scalar_t>(w * level.width * grad_x);
        p.grad_sampling_locations[2 * s + 1] = static_cast<scalar_t>(w * level.height * grad_y);
      }
    }
  }
}

template <typename scalar_t, typename grad_t>
Params<scalar_t, grad_t> make_params(const DeformableAttentionShape& s, const at::Tensor& value,
                                     const at::Tensor& spatial_shapes,
                                     const at::Tensor& level_start_index,
                                     const at::Tensor& sampling_locations,
                                     const at::Tensor& attention_weights) {
  TORCH_CHECK(s.channels < (1ll << 31) && s.num_queries < (1ll << 31) &&
                  s.num_heads < (1ll << 31) && s.num_levels * s.num_points < (1ll << 31),
              "multi_scale_deformable_attention (CUDA): sizes exceed the kernel's index range");
  Params<scalar_t, grad_t> p{};
  p.value = value.const_data_ptr<scalar_t>();
  p.spatial_shapes = spatial_shapes.const_data_ptr<int64_t>();
  p.level_start_index = level_start_index.const_data_ptr<int64_t>();
  p.sampling_locations = sampling_locations.const_data_ptr<scalar_t>();
  p.attention_weights = attention_weights.const_data_ptr<scalar_t>();
  p.rows = s.batch * s.num_queries * s.num_heads;
  p.S = static_cast<int>(s.num_values);
  p.M = static_cast<int>(s.num_heads);
  p.C = static_cast<int>(s.channels);
  p.Lq = static_cast<int>(s.num_queries);
  p.L = static_cast<int>(s.num_levels);
  p.P = static_cast<int>(s.num_points);
  return p;
}

bool aligned(const void* ptr, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Calls f.template operator()<V, G>() with the widest pack V (channels per lane) that divides
// the channels and that every pointer is aligned to, and G lanes per row: the packs of a row
// rounded up to a power of two, at most a warp.
template <typename scalar_t, typename F>
void dispatch_lanes(int64_t channels, std::initializer_list<const void*> pointers, F&& f) {
  constexpr int kMaxPack = kPackBytes / static_cast<int>(sizeof(scalar_t));
  int pack = kMaxPack;
  auto fits = [&](int v) {
    if (channels % v != 0) return false;
    for (const void* ptr : pointers) {
      if (!aligned(ptr, v * static_cast<int64_t>(sizeof(scalar_t)))) return false;
    }
    return true;
  };
  while (pack > 1 && !fits(pack)) pack /= 2;
  const int64_t packs = (channels + pack - 1) / pack;
  int lanes = 1;
  while (lanes < packs && lanes < 32) lanes *= 2;
  auto with_lanes = [&]<int V>() {
    switch (lanes) {
      case 1: f.template operator()<V, 1>(); break;
      case 2: f.template operator()<V, 2>(); break;
      case 4: f.template operator()<V, 4>(); break;
      case 8: f.template operator()<V, 8>(); break;
      case 16: f.template operator()<V, 16>(); break;
      default: f.template operator()<V, 32>(); break;
    }
  };
  switch (pack) {
    case 8:
      if constexpr (kMaxPack >= 8) with_lanes.template operator()<8>();
      break;
    case 4:
      if constexpr (kMaxPack >= 4) with_lanes.template operator()<4>();
      break;
    case 2: with_lanes.template operator()<2>(); break;
    default: with_lanes.template operator()<1>(); break;
  }
}

int64_t blocks_for(int64_t rows, int lanes) { return (rows * lanes + kThreads - 1) / kThreads; }

}  // namespace

at::Tensor multi_scale_deformable_attention_cuda(const at::Tensor& value,
                                                 const at::Tensor& spatial_shapes,
                                                 const at::Tensor& level_start_index,
                                                 const at::Tensor& sampling_locations,
                                                 const at::Tensor& attention_weights) {
  auto in = prepare_deformable_attention(value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights);
  TORCH_CHECK(value.is_cuda(), "multi_scale_deformable_attention_cuda: expected CUDA tensors");
  const auto& s = in.shape;
  if (in.out.numel() == 0 || s.num_levels == 0 || s.num_points == 0) return in.out;
  const c10::cuda::CUDAGuard guard(value.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "multi_scale_deformable_attention_cuda", [&] {
    auto p = make_params<scalar_t, scalar_t>(s, in.value, in.spatial_shapes,
                                             in.level_start_index, in.sampling_locations,
                                             in.attention_weights);
    p.out = in.out.data_ptr<scalar_t>();
    dispatch_lanes<scalar_t>(s.channels, {p.value, p.out}, [&]<int V, int G>() {
      forward_kernel<V, G><<<blocks_for(p.rows, G), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return in.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multi_scale_deformable_attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights) {
  auto in = prepare_deformable_attention_backward(grad_output, value, spatial_shapes,
                                                  level_start_index, sampling_locations,
                                                  attention_weights);
  TORCH_CHECK(value.is_cuda(),
              "multi_scale_deformable_attention_backward_cuda: expected CUDA tensors");
  if (!in.has_work) return in.grads();
  const auto& s = in.shape;
  const c10::cuda::CUDAGuard guard(value.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto dtype = value.scalar_type();
  // fp16/bf16: grad_value accumulated in an fp32 buffer (atomics on 16-bit floats would round
  // every addition), converted once at the end
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  auto grad_value =
      half ? at::zeros(value.sizes(), value.options().dtype(at::kFloat)) : in.grad_value;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype,
                                  "multi_scale_deformable_attention_backward_cuda", [&] {
    using grad_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto p = make_params<scalar_t, grad_t>(s, in.value, in.spatial_shapes,
                                           in.level_start_index, in.sampling_locations,
                                           in.attention_weights);
    p.grad_out = in.grad_output.const_data_ptr<scalar_t>();
    p.grad_value = grad_value.data_ptr<grad_t>();
    p.grad_sampling_locations = in.grad_sampling_locations.data_ptr<scalar_t>();
    p.grad_attention_weights = in.grad_attention_weights.data_ptr<scalar_t>();
    dispatch_lanes<scalar_t>(s.channels, {p.value, p.grad_out}, [&]<int V, int G>() {
      backward_kernel<V, G><<<blocks_for(p.rows, G), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (half) in.grad_value.copy_(grad_value);
  return in.grads();
}

TORCH_LIBRARY_IMPL(conditional_detr, CUDA, m) {
  m.impl("multi_scale_deformable_attention", &multi_scale_deformable_attention_cuda);
  m.impl("_multi_scale_deformable_attention_backward",
         &multi_scale_deformable_attention_backward_cuda);
}

}  // namespace conditional_detr
