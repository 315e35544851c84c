"""SEDAC ops: entropy, exit decision, KV prediction for skipped layers and the int8 drafter's linear,
as torch custom ops (`torch.ops.sedac.*`) with a torch reference everywhere and a Triton kernel on CUDA."""

from sedac.plugins.ops import entropy, exit_decision, int8_linear, kv_predict

__all__ = ["entropy", "exit_decision", "int8_linear", "kv_predict"]
