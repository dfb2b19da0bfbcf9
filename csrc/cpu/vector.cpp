#include "vector.h"

#include <ATen/Version.h>

#include <algorithm>
#include <string>

namespace conditional_detr {
namespace {

VectorLevel cpu_level() {
#if CDETR_LEVEL_BUILDS
  if (__builtin_cpu_supports("x86-64-v4")) return VectorLevel::kX86_64_V4;
  if (__builtin_cpu_supports("x86-64-v3")) return VectorLevel::kX86_64_V3;
#endif
  return VectorLevel::kBaseline;
}

// torch's level: "AVX512", "AVX2" or "DEFAULT" (ATEN_CPU_CAPABILITY, else the CPU's).
VectorLevel torch_level() {
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") return VectorLevel::kX86_64_V4;
  if (capability == "AVX2") return VectorLevel::kX86_64_V3;
  return VectorLevel::kBaseline;
}

}  // namespace

VectorLevel vector_level() {
  static const VectorLevel level = std::min(cpu_level(), torch_level());
  return level;
}

const char* vector_level_name(VectorLevel level) {
  switch (level) {
    case VectorLevel::kX86_64_V4:
      return "x86-64-v4";
    case VectorLevel::kX86_64_V3:
      return "x86-64-v3";
    default:
      return "baseline";
  }
}

}  // namespace conditional_detr
