"""The CogVideoX family adapter: CogVideoXTransformer3DModel (CogVideoX 1.0 and 1.5, text- and image-to-video): its
joint attention processors (plain or with fused q/k/v projections), and fp8 layerwise casting of its Linears. The VAE
(AutoencoderKLCogVideoX) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.cogvideox_attention import VkernCogVideoXAttnProcessor
from .processors import patch_processors


MODELS = ('CogVideoXTransformer3DModel',)  # what supports() takes (vkern.info and patch's errors list them)

def supports(obj):
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXTransformer3DModel

    return isinstance(obj, CogVideoXTransformer3DModel)


def apply(model, config, handle):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

    patch_processors(model, config, handle, (CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
                     lambda mode, original: VkernCogVideoXAttnProcessor(
                         mode, fused=isinstance(original, FusedCogVideoXAttnProcessor2_0)),
                     "CogVideoX attention processor")
