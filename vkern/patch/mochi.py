"""The Mochi family adapter: MochiTransformer3DModel: its joint attention processors, and fp8 layerwise casting of its
Linears. The VAE (AutoencoderKLMochi) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.mochi_attention import VkernMochiAttnProcessor
from .processors import ProcessorAdapter

ADAPTER = ProcessorAdapter("diffusers.models.transformers.transformer_mochi.MochiTransformer3DModel",
                           ["diffusers.models.attention_processor.MochiAttnProcessor2_0"],
                           lambda config, _: VkernMochiAttnProcessor(config.attention, config.fused_qk_norm_rope),
                           "Mochi attention processor")
