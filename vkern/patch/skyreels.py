"""The SkyReels-V2 family adapter: SkyReelsV2Transformer3DModel (Wan's architecture; text- and image-to-video and
diffusion forcing). Its attention is Wan's (SkyReelsV2AttnProcessor is WanAttnProcessor's code), so vkern's Wan
processor takes it, fused QK-norm + RoPE included; its blocks' glue (another per-token timestep layout) and its
block-causal mask (num_frame_per_block > 1: a general [1, 1, S, S] mask, which runs on SDPA, and in the 8-bit modes
as exact 16-bit attention, said once) stay diffusers'. fp8 layerwise casting of its Linears. The pipelines' VAE is
AutoencoderKLWan: the Wan adapter patches it."""
from ..modules.wan_attention import VkernWanAttnProcessor
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_skyreels_v2."
ADAPTER = ProcessorAdapter(_HERE + "SkyReelsV2Transformer3DModel", [_HERE + "SkyReelsV2AttnProcessor"],
                           lambda config, _: VkernWanAttnProcessor(config.attention, config.fused_qk_norm_rope),
                           "SkyReels-V2 attention processor")
