"""The LTX-2 family adapter: LTX2VideoTransformer3DModel (audio and video): the attention processors of its blocks
(plain or perturbed, for spatio-temporal guidance), the fused block glue (on by default since FastLaunch, see ADAPTER)
and fp8 layerwise casting of its Linears. The VAEs
(AutoencoderKLLTX2Video, AutoencoderKLLTX2Audio) and the vocoder have no adapter: a pipeline patch leaves them as
diffusers' with a warning."""
from ..modules.ltx2_attention import VkernLTX2AttnProcessor, VkernLTX2PerturbedAttnProcessor
from ..modules.ltx2_block import fused_ltx2_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_ltx2."


def _processor(config, original):
    perturbed = type(original).__name__ == "LTX2PerturbedAttnProcessor"
    return (VkernLTX2PerturbedAttnProcessor if perturbed else VkernLTX2AttnProcessor)(config.attention, config.fused_qk_norm_rope)


ADAPTER = ProcessorAdapter(_HERE + "LTX2VideoTransformer3DModel",
                           [_HERE + "LTX2AudioVideoAttnProcessor", _HERE + "LTX2PerturbedAttnProcessor"], _processor,
                           "LTX-2 attention processor",
                           # LTX-2 19B 512p is launch-bound on an H100: the fused glue was off by default while its
                           # host time made the step slower (508 vs 444 ms, run 148); with the per-call trims and
                           # FastLaunch it is faster (364 vs 440 ms, run 149; bench/NOTES.md session 43)
                           blocks=[(_HERE + "LTX2VideoTransformerBlock", fused_ltx2_block_forward)])
