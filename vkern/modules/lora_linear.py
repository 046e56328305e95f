"""A faster forward for PEFT's LoRA Linear (peft.tuners.lora.Linear, what diffusers' load_lora_weights installs), for
inference with plain LoRA adapters.

PEFT computes result + lora_B(lora_A(dropout(x))) * scaling: besides the two small GEMMs, lora_B's [tokens, out]
output is written, read and written again by "* scaling", and read with the result by "+", which writes a third
tensor: ~2.35 GB of memory traffic per Linear at Wan-14B 480p (32760 tokens, out 5120), about 0.27 s of a 2.85 s
step with a rank-64 LoRA on its 400 block Linears (bench/NOTES.md, run 166). Here lora_B's GEMM accumulates into the
base layer's output in place, scaled in the GEMM (cuBLAS addmm: beta 1, alpha = scaling): one read and one write of
the result, no intermediate of the output's size, and one rounding instead of three (fp32 accumulation).

Anything else runs PEFT's own forward: adapters disabled or merged, mixed-batch adapter names, LoRA variants (DoRA),
dropout in training, lora_B with a bias, hooks on the base layer or the adapters, autograd recording, dtypes that
differ between the result and the adapters."""
import torch
from torch import nn

from ._grad import records_autograd
from ._hooks import hooked


def lora_linear_forward(layer, x, *args, **kwargs):
    if args or kwargs or not isinstance(x, torch.Tensor) or not _plain_inference(layer, x):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if not adapters:
        return result
    if not _fits(layer, adapters, x, result):
        return type(layer).forward(layer, x)  # (the base layer runs again: rare, e.g. LoRA weights in fp32)
    rows = result.view(-1, result.shape[-1])  # (contiguous, checked): the base layer's own new tensor
    for a in adapters:
        down = nn.functional.linear(x, layer.lora_A[a].weight)
        rows.addmm_(down.view(-1, down.shape[-1]), layer.lora_B[a].weight.t(), alpha=layer.scaling[a])
    return result


def _plain_inference(layer, x):
    return not (layer.disable_adapters or layer.merged or hooked(layer.base_layer)
                or records_autograd(layer, x))


def _fits(layer, adapters, x, result):
    """Every active adapter a plain LoRA whose weights have the result's and x's dtype, on a contiguous result."""
    variants = getattr(layer, "lora_variant", {})  # (DoRA and other variants; older PEFT: use_dora)
    for a in adapters:
        down, up, dropout = layer.lora_A[a], layer.lora_B[a], layer.lora_dropout[a]
        if (a in variants or getattr(layer, "use_dora", {}).get(a, False) or up.bias is not None
                or type(down) is not nn.Linear or type(up) is not nn.Linear or hooked(down) or hooked(up)
                or not (type(dropout) is nn.Identity or (isinstance(dropout, nn.Dropout) and not dropout.training))
                or not down.weight.dtype == up.weight.dtype == x.dtype == result.dtype):
            return False
    return result.is_contiguous() and result.device == x.device
