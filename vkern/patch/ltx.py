"""The LTX-Video family adapter: LTXVideoTransformer3DModel: its self- and cross-attention processors, and fp8
layerwise casting of its Linears. The VAE (AutoencoderKLLTXVideo) has no adapter yet: a pipeline patch leaves it as
diffusers' with a warning."""
from ..modules.ltx_attention import VkernLTXVideoAttnProcessor
from .handle import refuse_context_parallel, refuse_wan_only


def _classes():
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor, LTXVideoTransformer3DModel
    return LTXVideoTransformer3DModel, LTXVideoAttnProcessor


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
        if isinstance(getattr(module, "processor", None), processor_class) and config.accepts(module, fqn):
            handle.set_processor(module, VkernLTXVideoAttnProcessor(config.attention), "LTX-Video attention processor")
