"""The CogVideoX family adapter: CogVideoXTransformer3DModel (CogVideoX 1.0 and 1.5, text- and image-to-video): its
joint attention processors, and fp8 layerwise casting of its Linears. The VAE (AutoencoderKLCogVideoX) has no
adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.cogvideox_attention import VkernCogVideoXAttnProcessor
from .handle import refuse_context_parallel, refuse_wan_only


def _classes():
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel
    return CogVideoXTransformer3DModel, CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0


def supports(obj):
    return isinstance(obj, _classes()[0])


def apply(model, config, handle):
    refuse_wan_only(model, config)
    refuse_context_parallel(model)
    if config.fp8 is not None:
        from .fp8 import quantize_linears

        quantize_linears(model, config, handle)
    _, plain, fused = _classes()
    for fqn, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, (plain, fused)) and config.accepts(module, fqn):
            handle.set_processor(module, VkernCogVideoXAttnProcessor(config.attention, isinstance(processor, fused)),
                                 "CogVideoX attention processor")
