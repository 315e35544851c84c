"""sedac-build: turn a Hugging Face causal LM into a self-contained engine directory."""
from sedac.builder.build import build_engine

__all__ = ["build_engine"]
