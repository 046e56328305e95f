"""The CogVideoX family adapter: CogVideoXTransformer3DModel (CogVideoX 1.0 and 1.5, text- and image-to-video): its
joint attention processors (plain or with fused q/k/v projections), the fused block glue (PatchConfig.fused_block),
and fp8 layerwise casting of its Linears. The VAE (AutoencoderKLCogVideoX) has no adapter yet: a pipeline patch leaves
it as diffusers' with a warning."""
from ..modules.cogvideox_attention import VkernCogVideoXAttnProcessor
from ..modules.cogvideox_block import fused_cogvideox_block_forward
from .processors import ProcessorAdapter

_PROCESSORS = "diffusers.models.attention_processor."
_HERE = "diffusers.models.transformers.cogvideox_transformer_3d."
ADAPTER = ProcessorAdapter(
    _HERE + "CogVideoXTransformer3DModel",
    [_PROCESSORS + "CogVideoXAttnProcessor2_0", _PROCESSORS + "FusedCogVideoXAttnProcessor2_0"],
    lambda config, original: VkernCogVideoXAttnProcessor(
        config.attention, fused=type(original).__name__ == "FusedCogVideoXAttnProcessor2_0",
        fused_qk_norm_rope=config.fused_qk_norm_rope),
    "CogVideoX attention processor",
    blocks=[(_HERE + "CogVideoXBlock", fused_cogvideox_block_forward)])
