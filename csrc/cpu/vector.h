// What the CPU kernels share to use wide vectors from an extension built for generic x86-64:
// per-instruction-set clones of a loop, picked at load time by feature (not CPU model, so AMD
// parts get the wide versions too), and GCC's vector extension, which states the vector width
// outright instead of hoping the loop vectorizer finds it (and lets reductions vectorize
// without -ffast-math).
#pragma once

#include <cstring>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__APPLE__)
#define CDETR_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CDETR_VECTOR_CLONES
#endif

// Loops whose gain is AVX-512 alone (the dropout hash's 64-bit multiplies vectorize only with
// vpmullq): one wide clone beside the baseline.
#if defined(__GNUC__) && defined(__x86_64__)
#define CDETR_AVX512_CLONE __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define CDETR_AVX512_CLONE
#endif

#define CDETR_ALWAYS_INLINE inline __attribute__((always_inline))

namespace conditional_detr {

// 32-byte vectors: native on AVX2, and measured as fast as 64-byte ones on AVX-512 in these
// load-bound loops.
template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T);
};

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
