"""Runtime: paged KV cache, inflight batching scheduler, sampler and the engine loop."""
