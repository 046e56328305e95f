"""The HunyuanVideo family adapter: HunyuanVideoTransformer3DModel (text-to-video and its image-conditioned
forms): its joint attention processors, and fp8 layerwise casting of its Linears. The VAE
(AutoencoderKLHunyuanVideo) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor
from .handle import refuse_context_parallel, refuse_wan_only


def _classes():
    from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoAttnProcessor2_0,
                                                                         HunyuanVideoTransformer3DModel)
    return HunyuanVideoTransformer3DModel, HunyuanVideoAttnProcessor2_0


def supports(obj):
    return isinstance(obj, _classes()[0])


def apply(model, config, handle):
    refuse_wan_only(model, config)
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
