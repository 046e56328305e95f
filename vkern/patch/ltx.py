"""The LTX-Video family adapter: LTXVideoTransformer3DModel: its self- and cross-attention processors, and fp8
layerwise casting of its Linears. The VAE (AutoencoderKLLTXVideo) has no adapter yet: a pipeline patch leaves it as
diffusers' with a warning."""
from ..modules.ltx_attention import VkernLTXVideoAttnProcessor
from .processors import patch_processors


MODELS = ('LTXVideoTransformer3DModel',)  # what supports() takes (vkern.info and patch's errors list them)

def supports(obj):
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel

    return isinstance(obj, LTXVideoTransformer3DModel)


def apply(model, config, handle):
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    patch_processors(model, config, handle, LTXVideoAttnProcessor,
                     lambda mode, _: VkernLTXVideoAttnProcessor(mode), "LTX-Video attention processor")
