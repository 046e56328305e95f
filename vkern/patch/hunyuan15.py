"""The HunyuanVideo 1.5 family adapter: HunyuanVideo15Transformer3DModel (text- and image-to-video): the joint
attention processors of its dual-stream blocks (the token refiner's text-only attention, another processor class,
stays diffusers'), the blocks' fused glue (PatchConfig.fused_block), and fp8 layerwise casting of its Linears. The
VAE (AutoencoderKLHunyuanVideo15) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.hunyuan15_attention import VkernHunyuanVideo15AttnProcessor
from ..modules.hunyuan_block import fused_dual_stream_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_hunyuan_video15."
ADAPTER = ProcessorAdapter(_HERE + "HunyuanVideo15Transformer3DModel", [_HERE + "HunyuanVideo15AttnProcessor2_0"],
                           lambda config, _: VkernHunyuanVideo15AttnProcessor(config.attention,
                                                                              config.fused_qk_norm_rope),
                           "HunyuanVideo 1.5 attention processor",
                           blocks=[(_HERE + "HunyuanVideo15TransformerBlock", fused_dual_stream_block_forward)])
