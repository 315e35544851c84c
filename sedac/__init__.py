"""SEDAC: build and run LLM inference engines with entropy-guided early exit."""
from sedac.runtime.llm import LLM
from sedac.runtime.outputs import CompletionOutput, RequestOutput
from sedac.runtime.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
