"""The LTX-2 family adapter: LTX2VideoTransformer3DModel (audio and video): the attention processors of its blocks
(plain or perturbed, for spatio-temporal guidance), the fused block glue (PatchConfig.fused_block=True: off by default,
see ADAPTER) and fp8 layerwise casting of its Linears. The VAEs
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
                           blocks=[(_HERE + "LTX2VideoTransformerBlock", fused_ltx2_block_forward)],
                           # Off unless fused_block=True: LTX-2 19B 512p on an H100 is launch-bound, and the
                           # fused glue cut 102 ms of kernel time but added more host time (508 vs 444 ms a step;
                           # bench/NOTES.md, run 148)
                           fused_by_default=False)
