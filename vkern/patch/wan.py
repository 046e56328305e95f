"""The Wan family adapter: WanTransformer3DModel, WanVACETransformer3DModel, WanAnimateTransformer3DModel and
ChronoEditTransformer3DModel (attention processors, fused block glue, optional FFN and attention chunking) and
AutoencoderKLWan (cached causal convolutions).

Wan VACE (diffusers' WanVACETransformer3DModel, e.g. WanVACEPipeline's transformer) is not a WanTransformer3DModel
subclass: its main blocks are WanTransformerBlocks and get the same fused forward; its VACE blocks
(WanVACETransformerBlock: the same glue on the control hidden states between an input and an output projection)
get modules/wan_vace.py's; every WanAttention in either gets vkern's processor, and fp8 casts its Linears as
for Wan. Its forward makes each VACE hint where it is used instead of all of them up front, and fuses the output norm
(modules/wan_vace.py); under sp (distributed/sp_wan.py) its VACE blocks run on each rank's tokens too.

Wan Animate (WanAnimateTransformer3DModel, Wan 2.2 Animate) holds diffusers' copies of WanAttention and
WanTransformerBlock (the same code, "Copied from" transformer_wan, other classes): they get vkern's processor and the
fused block forward as Wan's; its face adapter's attention (each frame's tokens to a handful of motion tokens) and
its forward stay diffusers'; under sp (distributed/sp_wan.py) each rank runs the face adapter on its own tokens, per
frame (modules/wan_animate_sp.py).

ChronoEdit (ChronoEditTransformer3DModel, NVIDIA's image editor on Wan 2.1 I2V-14B) is diffusers' Wan transformer with
its own RoPE table (a two-frame latent, the edit's input and output image, takes temporal positions 0 and
rope_temporal_skip_len - 1) and copies of WanAttention and WanTransformerBlock: the same code, other classes. Its
forward is Wan's, so it gets everything Wan's does: vkern's processor (the tables come from its rope as for Wan), the
fused blocks, the fused output norm, fp8, sp."""
import functools

from ..modules._grad import records_autograd
from ..modules.wan_attention import VkernWanAttnProcessor
from ..modules.wan_block import fused_block_forward
from ..modules.wan_vace import fused_vace_block_forward
from .handle import refuse_context_parallel

# what supports() takes (vkern.info, patch's errors)
MODELS = ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel",
          "ChronoEditTransformer3DModel", "AutoencoderKLWan")
# block class key -> (its fused forward, the handle's summary entry)
FUSED_BLOCKS = {"block": (fused_block_forward, "WanTransformerBlock.forward -> fused glue"),
                "vace_block": (fused_vace_block_forward, "WanVACETransformerBlock.forward -> fused glue")}


def _classes():
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, WanCausalConv3d
    from diffusers.models.transformers.transformer_wan import (WanAttention, WanTransformer3DModel,
                                                               WanTransformerBlock)
    from diffusers.models.transformers import transformer_chronoedit as chronoedit
    from diffusers.models.transformers import transformer_wan_animate as animate
    from diffusers.models.transformers.transformer_wan_vace import (WanVACETransformer3DModel,
                                                                    WanVACETransformerBlock)
    # "transformer": the classes whose forward is Wan's (vkern's fused forward takes them)
    return {"transformer": (WanTransformer3DModel, chronoedit.ChronoEditTransformer3DModel),
            "vace_transformer": WanVACETransformer3DModel,
            "animate_transformer": animate.WanAnimateTransformer3DModel, "vae": AutoencoderKLWan,
            "attention": (WanAttention, animate.WanAttention, chronoedit.WanAttention),
            "block": (WanTransformerBlock, animate.WanTransformerBlock, chronoedit.WanTransformerBlock),
            "vace_block": WanVACETransformerBlock, "causal_conv": WanCausalConv3d}


def supports(obj):
    classes = _classes()
    return isinstance(obj, (*classes["transformer"], classes["vace_transformer"], classes["animate_transformer"],
                            classes["vae"]))


def apply(obj, config, handle):
    classes = _classes()
    if isinstance(obj, classes["vae"]):
        _patch_vae(obj, config, handle, classes)
    else:
        _patch_transformer(obj, config, handle, classes)


def _patch_transformer(model, config, handle, classes):
    wan = isinstance(model, classes["transformer"])  # Wan's forward; else Wan VACE or Animate (no subclasses of it)
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
            continue
        block = next((key for key in FUSED_BLOCKS if isinstance(module, classes[key])), None)
        if block is not None and config.fused_blocks():
            # An instance forward, not a new class: diffusers' features that match the class name
            # (compile_repeated_blocks, _no_split_modules) keep working. The block chunks its FFN.
            fused, kind = FUSED_BLOCKS[block]
            forward = functools.partial(fused, module, ffn_chunk_size=config.ffn_chunk_size,
                                        attention_chunk_size=config.attention_chunk_size)
            handle.override_forward(module, forward, kind)
        elif block is not None and config.ffn_chunk_size is not None:
            from ..modules.feed_forward import ChunkedFeedForward

            chunked = ChunkedFeedForward.from_diffusers(module.ffn, chunk_size=config.ffn_chunk_size)
            handle.swap_module(module, "ffn", chunked, "FeedForward -> ChunkedFeedForward", fqn=f"{fqn}.ffn")
    if wan and config.fused_blocks() and config.accepts(model, ""):
        from ..modules.wan_transformer import fused_transformer_forward

        handle.override_forward(model, functools.partial(fused_transformer_forward, model),
                                f"{_forward_owner(model, classes)}.forward -> fused output norm")
    elif isinstance(model, classes["vace_transformer"]) and config.fused_blocks() and config.accepts(model, ""):
        from ..modules.wan_vace import fused_vace_transformer_forward

        handle.override_forward(model, functools.partial(fused_vace_transformer_forward, model),
                                "WanVACETransformer3DModel.forward -> hints where used, fused output norm")
    if config.sp is not None:
        # Last: it replaces the self-attention processors installed above with sharded ones.
        from ..distributed.sp_wan import apply_sequence_parallel

        apply_sequence_parallel(model, config.sp, handle)


def _forward_owner(model, classes):
    """The diffusers class whose forward model runs (a subclass of WanTransformer3DModel counts as it)."""
    return next(c.__name__ for c in classes["transformer"] if isinstance(model, c))


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
                           "WanCausalConv3d -> CachedCausalConv3d", fqn=fqn)
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
