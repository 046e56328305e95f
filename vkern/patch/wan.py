"""The Wan family adapter: WanTransformer3DModel (attention processors, optional FFN chunking) and
AutoencoderKLWan (cached causal convolutions)."""
import functools

from ..modules._grad import records_autograd
from ..modules.wan_attention import VkernWanAttnProcessor
from ..modules.wan_block import fused_block_forward
from .handle import refuse_context_parallel

MODELS = ("WanTransformer3DModel", "AutoencoderKLWan")  # what supports() takes (vkern.info, patch's errors)


def _classes():
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d
    from diffusers.models.transformers.transformer_wan import (WanAttention, WanTransformer3DModel,
                                                               WanTransformerBlock)
    return {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan, "attention": WanAttention,
            "block": WanTransformerBlock, "causal_conv": WanCausalConv3d}


def supports(obj):
    classes = _classes()
    return isinstance(obj, (classes["transformer"], classes["vae"]))


def apply(obj, config, handle):
    classes = _classes()
    if isinstance(obj, classes["transformer"]):
        _patch_transformer(obj, config, handle, classes)
    else:
        _patch_vae(obj, config, handle, classes)


def _patch_transformer(model, config, handle, classes):
    refuse_context_parallel(model)
    if config.fp8 is not None:
        from .fp8 import quantize_linears

        quantize_linears(model, config, handle)
    for fqn, module in model.named_modules():
        if not config.accepts(module, fqn):
            continue
        if isinstance(module, classes["attention"]):
            processor = VkernWanAttnProcessor(config.attention, config.fused_qk_norm_rope)
            handle.set_processor(module, processor, "WanAttention processor")
        elif isinstance(module, classes["block"]) and config.fused_block:
            # An instance forward, not a new class: diffusers' features that match the class name
            # (compile_repeated_blocks, _no_split_modules) keep working. The block chunks its FFN.
            forward = functools.partial(fused_block_forward, module, ffn_chunk_size=config.ffn_chunk_size,
                                        attention_chunk_size=config.attention_chunk_size)
            handle.override_forward(module, forward, "WanTransformerBlock.forward -> fused glue")
        elif isinstance(module, classes["block"]) and config.ffn_chunk_size is not None:
            from ..modules.feed_forward import ChunkedFeedForward

            chunked = ChunkedFeedForward.from_diffusers(module.ffn, chunk_size=config.ffn_chunk_size)
            handle.swap_module(module, "ffn", chunked, "FeedForward -> ChunkedFeedForward")
    if config.fused_block and config.accepts(model, ""):
        from ..modules.wan_transformer import fused_transformer_forward

        handle.override_forward(model, functools.partial(fused_transformer_forward, model),
                                "WanTransformer3DModel.forward -> fused output norm")
    if config.sp is not None:
        # Last: it replaces the self-attention processors installed above with sharded ones.
        from ..distributed.sp_wan import apply_sequence_parallel

        apply_sequence_parallel(model, config.sp, handle)


def _patch_vae(vae, config, handle, classes):
    if not config.vae:
        return
    from ..modules.causal_conv import CachedCausalConv3d

    # Collect first: swapping while iterating named_modules would visit the replacements.
    targets = [(fqn, m) for fqn, m in vae.named_modules()
               if isinstance(m, classes["causal_conv"]) and config.accepts(m, fqn)]
    parents = dict(vae.named_modules())
    for fqn, conv in targets:
        parent_name, _, name = fqn.rpartition(".")
        handle.swap_module(parents[parent_name], name, CachedCausalConv3d.from_wan(conv),
                           "WanCausalConv3d -> CachedCausalConv3d")
    if config.accepts(vae, ""):
        # The chunk loops themselves (vkern/modules/wan_vae.py). Instance attributes: decode/encode,
        # slicing and return_dict stay diffusers'; tiling and autograd keep diffusers' loop (on the
        # swapped convs above).
        _override_method(handle, vae, "_decode", functools.partial(_vae_decode, vae, config),
                         "AutoencoderKLWan._decode -> vkern chunk loop")
        _override_method(handle, vae, "_encode", functools.partial(_vae_encode, vae),
                         "AutoencoderKLWan._encode -> vkern chunk loop")


def _override_method(handle, obj, name, fn, kind):
    previous = obj.__dict__.get(name)
    setattr(obj, name, fn)

    def restore():
        if previous is None:
            delattr(obj, name)
        else:
            setattr(obj, name, previous)
    handle._undo.append(restore)
    handle.summary[kind] += 1


def _fast_vae(vae, t):
    """vkern's loop runs on CUDA tensors (VKERN_WAN_VAE=fast: everywhere; =diffusers: nowhere). On the
    CPU diffusers' loop over the swapped convs stays bit-identical to unpatched diffusers, which
    channels-last CPU kernels are not (their reduction order differs; ~1e-6 in fp32)."""
    import os

    force = os.environ.get("VKERN_WAN_VAE")
    if force not in (None, "", "fast", "diffusers"):
        raise ValueError(f"VKERN_WAN_VAE: expected 'fast' or 'diffusers', got {force!r}")
    if force == "diffusers" or vae.use_tiling or vae.training:
        return False
    if records_autograd(vae, t):
        return False  # the fused kernels have no backward
    return force == "fast" or t.is_cuda


def _vae_decode(vae, config, z, return_dict=True):
    if not _fast_vae(vae, z):
        return type(vae)._decode(vae, z, return_dict=return_dict)
    from diffusers.models.autoencoders.vae import DecoderOutput

    from ..modules import wan_vae

    out = wan_vae.decode(vae, z, output_device=config.vae_output_device)
    return DecoderOutput(sample=out) if return_dict else (out,)


def _vae_encode(vae, x):
    if not _fast_vae(vae, x):
        return type(vae)._encode(vae, x)
    from ..modules import wan_vae

    return wan_vae.encode(vae, x)
