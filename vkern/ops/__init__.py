"""vkern.ops: one file per capability; each public function checks its inputs, then calls a
torch.library custom op (torch.ops.vkern.*) that picks its backend (see _backend.py)."""
from .fused_attention import (attention, attention_8bit, attention_prequantized, k_to_8bit, k_to_e4m3, qk_norm_rope,
                              v_to_8bit, v_to_e4m3, value_offset)
from .fp8 import fp8_dequantize, fp8_linear, fp8_linear_compute, fp8_linear_prequantized, fp8_quantize
from .causal_conv import causal_conv3d, residual_add_, rms_norm_silu
from .feed_forward import feed_forward
from .block_glue import gate_residual, gate_residual_, gelu_tanh_fp8, layernorm_modulate, rms_gate_residual, rms_gate_residual_

__all__ = ["attention", "attention_8bit", "attention_prequantized", "k_to_8bit", "k_to_e4m3", "v_to_8bit", "v_to_e4m3", "value_offset", "qk_norm_rope", "fp8_quantize", "fp8_dequantize", "fp8_linear", "fp8_linear_compute", "fp8_linear_prequantized", "gelu_tanh_fp8", "causal_conv3d", "rms_norm_silu", "residual_add_", "feed_forward", "layernorm_modulate", "gate_residual", "gate_residual_", "rms_gate_residual", "rms_gate_residual_"]
