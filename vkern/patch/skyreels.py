"""The SkyReels-V2 family adapter: SkyReelsV2Transformer3DModel (Wan's architecture; text- and image-to-video and
diffusion forcing). Its attention is Wan's (SkyReelsV2AttnProcessor is WanAttnProcessor's code), so vkern's Wan
processor takes it, fused QK-norm + RoPE included, and its block-causal mask (num_frame_per_block > 1) runs as one
unmasked call per frame block (modules/skyreels_attention.py; in the 8-bit modes as exact 16-bit attention, said
once); its blocks run Wan's fused glue (PatchConfig.fused_block; modules/wan_block.py, with the mask and its
per-token timestep layout). fp8 layerwise casting of its Linears.
The pipelines' VAE is AutoencoderKLWan: the Wan adapter patches it."""
from ..modules.skyreels_attention import VkernSkyReelsV2AttnProcessor
from ..modules.wan_block import fused_skyreels_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_skyreels_v2."
ADAPTER = ProcessorAdapter(_HERE + "SkyReelsV2Transformer3DModel", [_HERE + "SkyReelsV2AttnProcessor"],
                           lambda config, _: VkernSkyReelsV2AttnProcessor(config.attention,
                                                                          config.fused_qk_norm_rope),
                           "SkyReels-V2 attention processor",
                           blocks=[(_HERE + "SkyReelsV2TransformerBlock", fused_skyreels_block_forward)])
