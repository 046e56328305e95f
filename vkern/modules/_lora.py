"""The LoRA scale of a call, for the model forwards vkern replaces (Wan, Wan VACE): diffusers' own forwards are
wrapped in @apply_lora_scale("attention_kwargs"), which scales the PEFT LoRA layers by attention_kwargs["scale"]
for the call and reads nothing else from attention_kwargs (diffusers 0.42); a replaced forward does the same here."""
import contextlib


@contextlib.contextmanager
def lora_scale(model, attention_kwargs):
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers

    scale = (attention_kwargs or {}).get("scale", 1.0)
    if not USE_PEFT_BACKEND:  # (no PEFT: no LoRA layers to scale; diffusers warns and goes on too)
        yield
        return
    scale_lora_layers(model, scale)
    try:
        yield
    finally:
        unscale_lora_layers(model, scale)
