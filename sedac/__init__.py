"""SEDAC: build and run LLM inference engines with entropy-guided early exit."""

import os

# Before torch loads (c10 reads it once): buffers of 2 MB and more (weights, the KV pool) on transparent
# huge pages. A decode step streams them all; with 4 KB pages it measured ~5% slower (SmolLM2 int4 and fp32
# on 2 cores), the TLB missing on every scattered KV block.
for _name in ("THP_MEM_ALLOC_ENABLE", "C10_THP_MEM_ALLOC_ENABLE"):
    os.environ.setdefault(_name, "1")

from sedac.runtime.llm import LLM  # noqa: E402  (after the environment above)
from sedac.runtime.outputs import CompletionOutput, RequestOutput  # noqa: E402
from sedac.runtime.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
