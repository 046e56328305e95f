"""The HunyuanVideo family adapter: HunyuanVideoTransformer3DModel (text-to-video and its image-conditioned forms)
and HunyuanVideoFramepackTransformer3DModel (FramePack: the same blocks, with history latents in the sequence):
the joint attention processors of its dual- and single-stream blocks (the token refiner's text-only attention,
another processor class, stays diffusers'), the fused glue of both kinds of block (PatchConfig.fused_block), and fp8
layerwise casting of its Linears. The VAE
(AutoencoderKLHunyuanVideo) has no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
from ..modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor
from ..modules.hunyuan_block import fused_dual_stream_block_forward, fused_single_stream_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_hunyuan_video."
ADAPTER = ProcessorAdapter((_HERE + "HunyuanVideoTransformer3DModel",
                            "diffusers.models.transformers.transformer_hunyuan_video_framepack."
                            "HunyuanVideoFramepackTransformer3DModel"), [_HERE + "HunyuanVideoAttnProcessor2_0"],
                           lambda config, _: VkernHunyuanVideoAttnProcessor(config.attention,
                                                                            config.fused_qk_norm_rope),
                           "HunyuanVideo attention processor",
                           blocks=[(_HERE + "HunyuanVideoTransformerBlock", fused_dual_stream_block_forward),
                                   (_HERE + "HunyuanVideoSingleTransformerBlock", fused_single_stream_block_forward)])
