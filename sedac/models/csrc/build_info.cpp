// What this library was compiled for: shown once at engine load and by `sedac-run env`.
#include <torch/extension.h>

#include <string>

// SEDAC_TARGET and SEDAC_TORCH_VERSION (torch.__version__ at build time) come from setup.py.

namespace {

// The widest vector extension the compiler was allowed to use.
const char* isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "AVX-512+VNNI";   // block_linear_a8's integer dot products
#elif defined(__AVX512F__)
  return "AVX-512";
#elif defined(__AVX2__)
  return "AVX2";
#else
  return "scalar";
#endif
}

std::string build_info() {
  return std::string("target=") + SEDAC_TARGET + " isa=" + isa() + " torch=" + SEDAC_TORCH_VERSION;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sedac_cpu, m) { m.def("build_info() -> str", &build_info); }
