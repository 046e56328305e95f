"""The LTX-Video family adapter: LTXVideoTransformer3DModel: its self- and cross-attention processors, the fused
block glue (PatchConfig.fused_block), and fp8 layerwise casting of its Linears. The VAE (AutoencoderKLLTXVideo) has
no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.ltx_attention import VkernLTXVideoAttnProcessor
from ..modules.ltx_block import fused_ltx_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_ltx."
ADAPTER = ProcessorAdapter(_HERE + "LTXVideoTransformer3DModel", [_HERE + "LTXVideoAttnProcessor"],
                           lambda config, _: VkernLTXVideoAttnProcessor(config.attention, config.fused_qk_norm_rope),
                           "LTX-Video attention processor",
                           blocks=[(_HERE + "LTXVideoTransformerBlock", fused_ltx_block_forward)])
