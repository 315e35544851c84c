// How the panel kernels (panel_linear.cpp, block_linear.cpp) split rows x panels into register tiles
// and threads. A kernel supplies `tile<R, P>(panel, x, ldx, y, ldy)`: R rows of x against panels
// panel..panel+P-1, writing their 16 * P outputs per row. Each output is one chain over the inputs
// whatever the tile, so a row's result is bitwise the same alone or in any batch.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "parallel_tasks.h"

namespace sedac_panels {

constexpr int64_t kPanel = 16;      // outputs per panel: one AVX-512 or two AVX2 registers
constexpr int64_t kGroup = 6;       // panels per parallel task (a multiple of every tile's P)

// A batch-1 tile reads a whole task (kGroup panels) as kGroup interleaved streams, faster than the
// hardware prefetcher follows them from memory. So while it runs, the next task's bytes (in codes,
// scales and minimums alike contiguous after this task's) go to L2 at the rate these are read
// (interleaved A/B on SmolLM2's 30 layers at batch 1: int4 2.6 vs 3.1 ms, gguf 4.1 vs 4.6 ms; the
// 8-bit head 0.68 vs 0.76 ms; prefetching into L1 was slower).
inline void prefetch_l2(const void* from, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(static_cast<const char*>(from) + i, 0, 2);
}

// R (< 6) rows of x against `count` panels from `first`: P = 6 / R at a time, then one at a time.
template <int R, class Kernel>
inline void row_block(const Kernel& k, int64_t first, int64_t count, const float* x, int64_t n, float* y, int64_t ldy) {
  constexpr int P = 6 / R;
  int64_t p = 0;
  for (; p + P <= count; p += P) k.template tile<R, P>(first + p, x, n, y + p * kPanel, ldy);
  for (; p < count; ++p) k.template tile<R, 1>(first + p, x, n, y + p * kPanel, ldy);
}

// All T rows of x against `count` (<= kGroup) panels from `first`, writing y (row stride ldy).
// Whole 6-row tiles run panel by panel, so each panel stays in cache across them; the remaining rows
// then reuse the group from cache (a pass over all of a task's panels per row tile re-read the LM
// head from memory for every tile: 2x slower at 32 rows).
template <class Kernel>
void panel_group(const Kernel& k, int64_t first, int64_t count, const float* x, int64_t t, int64_t n, float* y,
                 int64_t ldy) {
  int64_t r = t - t % 6;
  for (int64_t p = 0; p < count; ++p)
    for (int64_t q = 0; q < r; q += 6) k.template tile<6, 1>(first + p, x + q * n, n, y + q * ldy + p * kPanel, ldy);
  if (t - r == 3 || t - r == 5) {   // 4 rows run as 2 + 2: int8 conversions crowd a 3-row tile's registers
    row_block<3>(k, first, count, x + r * n, n, y + r * ldy, ldy);
    r += 3;
  }
  for (; t - r >= 2; r += 2) row_block<2>(k, first, count, x + r * n, n, y + r * ldy, ldy);
  if (t - r == 1) row_block<1>(k, first, count, x + r * n, n, y + r * ldy, ldy);
}

// `count` panels (stride `stride` elements) widened to fp32 by widen(p, out) (panel p of the task into out),
// into this thread's buffer, reused call after call: valid until the thread's next call.
template <class Widen>
inline const float* widened_panels(int64_t count, int64_t stride, Widen&& widen) {
  thread_local std::vector<float> dense;
  dense.resize(count * stride);
  for (int64_t p = 0; p < count; ++p) widen(p, dense.data() + p * stride);
  return dense.data();
}

// x [T, n] fp32 against `num_panels` panels -> [T, out_features], the task groups across threads.
// A kernel may run a task's panels its own way (`k.run_group(...)` returns true): the block kernel and bf16
// panels widen them to fp32 once (widened_panels) when many rows share them.
template <class Kernel>
torch::Tensor run_panels(const Kernel& k, const torch::Tensor& x, int64_t num_panels, int64_t out_features) {
  const int64_t t = x.size(0), n = x.size(1), m = num_panels * kPanel;
  auto y = torch::empty({t, m}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_tasks((num_panels + kGroup - 1) / kGroup, [&](int64_t g) {
    const int64_t first = g * kGroup, count = std::min(kGroup, num_panels - first);
    if (!k.run_group(first, count, xp, t, yp + first * kPanel, m))
      panel_group(k, first, count, xp, t, n, yp + first * kPanel, m);
  });
  return m == out_features ? y : y.narrow(1, 0, out_features).contiguous();   // a padded last panel
}

}  // namespace sedac_panels
