"""The Mochi family adapter: MochiTransformer3DModel: its joint attention processors, and fp8 layerwise casting of its
Linears. The VAE (AutoencoderKLMochi) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.mochi_attention import VkernMochiAttnProcessor
from .processors import patch_processors

MODELS = ("MochiTransformer3DModel",)  # what supports() takes (vkern.info and patch's errors list them)


def supports(obj):
    from diffusers.models.transformers.transformer_mochi import MochiTransformer3DModel

    return isinstance(obj, MochiTransformer3DModel)


def apply(model, config, handle):
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    patch_processors(model, config, handle, MochiAttnProcessor2_0, lambda mode, _: VkernMochiAttnProcessor(mode),
                     "Mochi attention processor")
