// What the CPU kernels share to use wide vectors from an extension built for generic x86-64:
// per-instruction-set builds of a loop, picked at run time by feature (not CPU model, so AMD
// parts get the wide versions too) and capped where torch itself is held lower, and GCC's
// vector extension, which states the vector width outright instead of hoping the loop
// vectorizer finds it (and lets reductions vectorize without -ffast-math).
#pragma once

#include <cstring>

#define CDETR_ALWAYS_INLINE inline __attribute__((always_inline))

namespace conditional_detr {

// The instruction set levels the loops are built for.
enum class VectorLevel { kBaseline = 0, kX86_64_V3 = 1, kX86_64_V4 = 2 };

// The level the loops run at: the highest the CPU has, capped at the level torch's own kernels
// run at (ATEN_CPU_CAPABILITY=avx2 or default holds these to AVX2 or baseline x86-64 too).
// Decided once, at the first call.
VectorLevel vector_level();

// "x86-64-v4", "x86-64-v3" or "baseline".
const char* vector_level_name(VectorLevel level);

}  // namespace conditional_detr

// GCC on x86-64 builds a function for a given instruction set level (other compilers and
// processors get the baseline build alone).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__APPLE__)
#define CDETR_LEVEL_BUILDS 1
#else
#define CDETR_LEVEL_BUILDS 0
#endif

#if CDETR_LEVEL_BUILDS
#define CDETR_LEVEL_BUILD(prefix, ret, name, level, body, params, args) \
  prefix __attribute__((target("arch=" level))) ret name params { return body args; }

// Defines `ret name params` running `body args` built for AVX-512 (x86-64-v4) and for AVX2
// (x86-64-v3), and `baseline_body args` for baseline x86-64, choosing by vector_level() at each
// call (a predictable branch; the loops inside run for hundreds of cycles). The bodies are
// always-inline functions: the compiler inlines each into its build and vectorizes it for that
// build's instructions. prefix is empty or a template head, such as
// `template <typename scalar_t>`, whose parameters the arguments deduce.
#define CDETR_LEVEL_DISPATCH(prefix, ret, name, body, baseline_body, params, args)  \
  CDETR_LEVEL_BUILD(prefix, ret, name##_x86_64_v4, "x86-64-v4", body, params, args) \
  CDETR_LEVEL_BUILD(prefix, ret, name##_x86_64_v3, "x86-64-v3", body, params, args) \
  prefix ret name params {                                                         \
    switch (::conditional_detr::vector_level()) {                                  \
      case ::conditional_detr::VectorLevel::kX86_64_V4:                            \
        return name##_x86_64_v4 args;                                              \
      case ::conditional_detr::VectorLevel::kX86_64_V3:                            \
        return name##_x86_64_v3 args;                                              \
      default:                                                                     \
        return baseline_body args;                                                 \
    }                                                                              \
  }
#else
#define CDETR_LEVEL_DISPATCH(prefix, ret, name, body, baseline_body, params, args) \
  prefix ret name params { return baseline_body args; }
#endif

// The same body at every level.
#define CDETR_VECTOR_LEVELS_WITH(prefix, ret, name, body, params, args) \
  CDETR_LEVEL_DISPATCH(prefix, ret, name, body, body, params, args)
#define CDETR_VECTOR_LEVELS(ret, name, body, params, args) \
  CDETR_LEVEL_DISPATCH(, ret, name, body, body, params, args)

namespace conditional_detr {

// kBytes-byte vectors of T.
template <typename T, int kBytes>
struct Vec {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / sizeof(T);
};

// 32-byte vectors: native on AVX2, and measured as fast as 64-byte ones on AVX-512 in these
// load-bound loops. Baseline x86-64 computes them as two 16-byte halves.
template <typename T>
using Vec32 = Vec<T, 32>;

// Unaligned vector load and store through memory: returning a 32-byte vector by value from a
// function compiled for baseline x86-64 would change the ABI (and GCC warns).
template <typename V>
CDETR_ALWAYS_INLINE void load_vec(V& v, const void* p) {
  std::memcpy(&v, p, sizeof(V));
}

template <typename V>
CDETR_ALWAYS_INLINE void store_vec(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

}  // namespace conditional_detr
