"""The LTX-Video family adapter: LTXVideoTransformer3DModel: its self- and cross-attention processors, the fused
block glue (PatchConfig.fused_block), and fp8 layerwise casting of its Linears. The VAE (AutoencoderKLLTXVideo) has
no adapter yet: a pipeline patch leaves it as diffusers' with a warning."""
import functools

from ..modules.ltx_attention import VkernLTXVideoAttnProcessor
from ..modules.ltx_block import fused_ltx_block_forward
from .processors import ProcessorAdapter

_HERE = "diffusers.models.transformers.transformer_ltx."


class _LTXAdapter(ProcessorAdapter):
    def apply(self, model, config, handle):
        super().apply(model, config, handle)
        if not config.fused_block:
            return
        from diffusers.models.transformers.transformer_ltx import LTXVideoTransformerBlock

        for fqn, module in model.named_modules():
            if isinstance(module, LTXVideoTransformerBlock) and config.accepts(module, fqn):
                # An instance forward, as for Wan: diffusers' features that match the class name keep working.
                handle.override_forward(module, functools.partial(fused_ltx_block_forward, module),
                                        "LTXVideoTransformerBlock.forward -> fused glue")


ADAPTER = _LTXAdapter(_HERE + "LTXVideoTransformer3DModel", [_HERE + "LTXVideoAttnProcessor"],
                      lambda config, _: VkernLTXVideoAttnProcessor(config.attention, config.fused_qk_norm_rope),
                      "LTX-Video attention processor")
