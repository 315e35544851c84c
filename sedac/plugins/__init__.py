"""SEDAC ops: entropy, exit decision and KV prediction for skipped layers, as torch custom ops
(`torch.ops.sedac.*`) with a torch reference everywhere and a Triton kernel on CUDA."""
from sedac.plugins.ops import entropy, exit_decision, kv_predict

__all__ = ["entropy", "exit_decision", "kv_predict"]
