"""The HunyuanVideo family adapter: HunyuanVideoTransformer3DModel (text-to-video and its image-conditioned
forms): its joint attention processors, and fp8 layerwise casting of its Linears. The VAE
(AutoencoderKLHunyuanVideo) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor
from .handle import refuse_context_parallel

# PatchConfig fields that change Wan's blocks only; asked for here they would do nothing, so they are errors.
_WAN_ONLY = ("ffn_chunk_size", "attention_chunk_size", "sp")


def _classes():
    from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                         HunyuanVideoTransformer3DModel)
    return HunyuanVideoTransformer3DModel, HunyuanVideoAttnProcessor2_0


def supports(obj):
    return isinstance(obj, _classes()[0])


def apply(model, config, handle):
    asked = [name for name in _WAN_ONLY if getattr(config, name) is not None]
    if asked:
        raise ValueError(f"vkern.patch: PatchConfig.{', '.join(asked)}: not available for HunyuanVideoTransformer3DModel "
                         "(Wan transformers only); leave them None")
    refuse_context_parallel(model)
    if config.fp8 is not None:
        from .fp8 import quantize_linears

        quantize_linears(model, config, handle)
    processor_class = _classes()[1]
    for fqn, module in model.named_modules():
        # The joint attention of the dual- and single-stream blocks; the token refiner's text-only attention
        # (another processor class) stays diffusers'.
        if isinstance(getattr(module, "processor", None), processor_class) and config.accepts(module, fqn):
            handle.set_processor(module, VkernHunyuanVideoAttnProcessor(config.attention),
                                 "HunyuanVideo attention processor")
