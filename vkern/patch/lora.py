"""PEFT LoRA layers in a patched model: vkern's forward for them (modules/lora_linear.py), in every family. A LoRA
loaded after the patch keeps PEFT's own forward (correct, slower)."""
import functools
import sys

from ..modules.lora_linear import lora_linear_forward


def patch_lora_layers(model, config, handle):
    if "peft" not in sys.modules:  # (no PEFT imported: no LoRA layers)
        return
    from peft.tuners.lora import Linear

    for fqn, module in model.named_modules():
        # type(), not isinstance: PEFT's quantized-base subclasses have forwards of their own
        if type(module) is Linear and config.accepts(module, fqn):
            handle.override_forward(module, functools.partial(lora_linear_forward, module),
                                    "PEFT LoRA Linear.forward -> LoRA accumulated in place")
