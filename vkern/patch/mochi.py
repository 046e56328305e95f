"""The Mochi family adapter: MochiTransformer3DModel: its joint attention processors, the fused block glue
(PatchConfig.fused_block), and fp8 layerwise casting of its Linears. The VAE (AutoencoderKLMochi) has no adapter yet: a
pipeline patch leaves it as diffusers' with a warning."""
from ..modules.mochi_attention import VkernMochiAttnProcessor
from ..modules.mochi_block import fused_mochi_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_mochi."
ADAPTER = ProcessorAdapter(_HERE + "MochiTransformer3DModel",
                           ["diffusers.models.attention_processor.MochiAttnProcessor2_0"],
                           lambda config, _: VkernMochiAttnProcessor(config.attention, config.fused_qk_norm_rope),
                           "Mochi attention processor",
                           blocks=[(_HERE + "MochiTransformerBlock", fused_mochi_block_forward)])
