"""sedac-build: turn a Hugging Face causal LM into a self-contained engine directory."""

from sedac.builder.build import build_engine
from sedac.builder.sedac_build import SedacOptions

__all__ = ["SedacOptions", "build_engine"]
