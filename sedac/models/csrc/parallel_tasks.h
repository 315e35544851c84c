// Tasks across the intra-op threads with work stealing (the panel kernels, paged attention).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace sedac_panels {

// A thread's range of tasks [front, back) in one word, so that its owner (from the front) and a thief (from
// the back) never take the same task.
inline int64_t take(std::atomic<uint64_t>& range, bool from_front) {
  uint64_t v = range.load(std::memory_order_relaxed);
  for (;;) {
    const uint64_t front = v & 0xffffffffu, back = v >> 32;
    if (front >= back) return -1;
    const uint64_t next = from_front ? (back << 32) | (front + 1) : ((back - 1) << 32) | front;
    if (range.compare_exchange_weak(v, next, std::memory_order_relaxed)) return from_front ? front : back - 1;
  }
}

// run(task) for tasks [0, count): a contiguous range per thread, walked front to back (a task prefetches
// the next one into this core's L2); a thread done with its range then takes tasks from the back of the
// others'. On a shared machine (a server beside its clients) a preempted thread no longer holds up the
// whole call while the other waits at the barrier.
template <class F>
void parallel_tasks(int64_t count, const F& run) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  std::vector<std::atomic<uint64_t>> ranges(std::max<int64_t>(threads, 1));
  for (int64_t i = 0; i < threads; ++i)
    ranges[i].store((uint64_t(count * (i + 1) / threads) << 32) | uint64_t(count * i / threads));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t me = begin; me < end; ++me)
      for (int64_t k = 0; k < threads; ++k)
        for (int64_t task; (task = take(ranges[(me + k) % threads], k == 0)) >= 0;) run(task);
  });
}

}  // namespace sedac_panels
