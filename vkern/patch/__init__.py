"""vkern.patch(obj, config=None): swap vkern's modules and processors into a diffusers pipeline or
model; returns a PatchHandle whose undo() restores the originals exactly.

One adapter per model family (patch/wan.py, ...). A pipeline is patched component by component.
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..distributed.sp_wan import SPConfig
from ..modules.wan_attention import ATTENTION_MODES
from . import cogvideox, hunyuan, hunyuan15, ltx, ltx2, mochi, skyreels, wan
from .handle import PatchHandle, patched_handle
from .lora import patch_lora_layers

# family -> its adapter: MODELS (the diffusers classes it takes), supports(obj), apply(model, config, handle)
ADAPTERS = {"wan": wan, "hunyuan": hunyuan.ADAPTER, "hunyuan15": hunyuan15.ADAPTER, "cogvideox": cogvideox.ADAPTER,
            "ltx": ltx.ADAPTER, "ltx2": ltx2.ADAPTER, "mochi": mochi.ADAPTER, "skyreels": skyreels.ADAPTER}
FP8_MODES = (None, "storage", "compute")


@dataclass
class PatchConfig:
    """What vkern.patch changes.

    attention           "auto" (the fastest exact backend, measured per head dim and key count: vkern's
                        CUDA kernel for head dims 64 and 128 with many keys on Hopper, else cuDNN)
                        | "bf16" (vkern's own exact kernels on GPUs: the CUDA one where it can run, else
                        the Triton one) | "sdpa" | "reference" | opt-in 8-bit: "int8pv" (int8 Q/K, u8 P,
                        int8 V, P V exact in int32: the fastest on Hopper and about half fp8's error),
                        "fp8" (int8 Q/K, e4m3 P/V, O in fp32) or "int8" (int8 Q/K, bf16 P/V, Triton: the
                        most accurate, slower than the exact default); accuracy and speed in the
                        README's table of attention modes
    fused_qk_norm_rope  fuse the q/k norm + RoPE into one kernel pass (Wan, SkyReels-V2, LTX-Video, LTX-2 with its
                        interleaved RoPE, CogVideoX's per-head LayerNorm, and the video stream's per-head RMSNorm of
                        HunyuanVideo 1.0 / FramePack / 1.5 and Mochi)
    ffn_chunk_size      tokens per feed-forward chunk (None: no chunking; Wan only, an error for other models)
    attention_chunk_size  query tokens per attention chunk in the fused Wan blocks (None: no chunking):
                        K/V for the whole sequence first, then each chunk's q -> attention -> output
                        projection -> residual, so no full-sequence q/output tensors (activation memory)
    fused_block         None (default): on for every family but LTX-2 (its 19B 512p step measured slower with it on
                        an H100: launch-bound, and the fused glue costs the host more per call than diffusers' ops;
                        README, LTX-2); True / False: on / off for every family. On:
                        Wan blocks (SkyReels-V2's too)
                        run fused LayerNorm+modulate and gate+residual kernels (no fp32 copies of the hidden states)
                        and chunk their FFN by ffn_chunk_size; WanTransformer3DModel's output norm + modulate is one
                        such pass too (Wan VACE's too, which also makes each VACE hint where it is used);
                        HunyuanVideo's (1.0, 1.5, FramePack), LTX-Video's, LTX-2's, CogVideoX's and Mochi's blocks run
                        fused LayerNorm / RMSNorm + modulate and gate + residual kernels rounding as diffusers does
    vae                 cached causal convolutions in the Wan VAE, and its fast chunked encode/decode loop on CUDA
    vae_output_device   None (decoded video on the latents' device) or e.g. "cpu": decoded frames are
                        written into pinned CPU memory as they come, capping the GPU peak
    filter_fn           (module, fully qualified name) -> bool; False leaves that module as it is
    fp8                 None | "storage" | "compute": nn.Linear -> Fp8Linear in the transformer
    fp8_filter_fn       (module, fqn) -> bool choosing the Linears to quantize (default: diffusers'
                        layerwise-casting skip list for the model class: embeddings, norms, proj_out, ...)
    fp8_keep_original   "cpu": park the original bf16 weights on the CPU so undo() is exact;
                        "drop": free them (undo() then raises)
    fp8_fast_accum      compute mode: cuBLASLt fast fp8 accumulation (1.1x faster GEMMs on an H200,
                        same SQNR at Wan shapes); False for full-precision accumulation
    sp                  None | vkern.distributed.SPConfig: run the Wan transformer sequence-parallel
                        (Ulysses) over the SPConfig's process group (under torchrun, every rank patches);
                        the Wan family's transformers: Wan, Wan VACE, Wan Animate, ChronoEdit (an error for the
                        other families)
    """
    attention: str = "auto"
    fused_qk_norm_rope: bool = True
    ffn_chunk_size: Optional[int] = None
    attention_chunk_size: Optional[int] = None
    fused_block: Optional[bool] = None
    vae: bool = True
    vae_output_device: Optional[str] = None
    filter_fn: Optional[Callable] = None
    fp8: Optional[str] = None
    fp8_filter_fn: Optional[Callable] = None
    fp8_keep_original: str = "cpu"
    fp8_fast_accum: bool = True
    sp: Optional[SPConfig] = None

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise for a value the patch cannot take (run when the config is built, and again by patch(), so a field
        changed after construction is checked too)."""
        for name in ("fused_qk_norm_rope", "fused_block", "vae", "fp8_fast_accum"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "fused_block" and value is None):
                raise TypeError(f"PatchConfig.{name}: expected True or False{' or None' * (name == 'fused_block')}, "
                                f"got {value!r}")
        if self.vae_output_device is not None:
            try:
                torch.device(self.vae_output_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"PatchConfig.vae_output_device: expected None or a device such as 'cpu', got "
                                 f"{self.vae_output_device!r}") from err
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"PatchConfig.fp8: expected one of {FP8_MODES}, got {self.fp8!r}")
        if self.fp8_keep_original not in ("cpu", "drop"):
            raise ValueError(f"PatchConfig.fp8_keep_original: expected 'cpu' or 'drop', got {self.fp8_keep_original!r}")
        if self.fp8_filter_fn is not None and not callable(self.fp8_filter_fn):
            raise TypeError("PatchConfig.fp8_filter_fn: expected a callable (module, fqn) -> bool")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"PatchConfig.attention: expected one of {ATTENTION_MODES}, got {self.attention!r}")
        for name in ("ffn_chunk_size", "attention_chunk_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"PatchConfig.{name}: expected a positive int or None, got {value!r}")
        if self.attention_chunk_size is not None and self.fused_block is False:
            raise ValueError("PatchConfig.attention_chunk_size: the chunked attention runs in the fused Wan block "
                             "(fused_block=True)")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError("PatchConfig.filter_fn: expected a callable (module, fqn) -> bool")
        if self.sp is not None and not isinstance(self.sp, SPConfig):
            raise TypeError(f"PatchConfig.sp: expected None or a vkern.distributed.SPConfig, got {type(self.sp).__name__}")

    def fused_blocks(self, family_default=True):
        """Whether a family's blocks get the fused glue: fused_block, or the family's default when it is None."""
        return family_default if self.fused_block is None else self.fused_block

    def accepts(self, module, fqn):
        return self.filter_fn is None or bool(self.filter_fn(module, fqn))


def patch(obj, config=None):
    """Patch a diffusers pipeline (its supported components) or a supported model in place; config: a PatchConfig
    (None: the defaults). Returns a PatchHandle: handle.undo() (or leaving `with vkern.patch(...)`) restores the
    original modules and processors, so outputs are bit-identical again. Works before or after .to(device), for
    inference: with autograd recording, diffusers' own ops run (vkern's kernels have no backward). Raises for
    unsupported objects, double patching and hooks the patch would bypass (diffusers' caches, offloading,
    layerwise casting: patch first, then enable them); a failed patch leaves the model as it was."""
    config = config or PatchConfig()
    if not isinstance(config, PatchConfig):
        raise TypeError(f"config: expected a vkern.PatchConfig, got {type(config).__name__}")
    config.validate()
    _require_diffusers()
    handle = PatchHandle(obj, config)
    adapter = _adapter_for(obj)
    if adapter is not None:
        handle.mark(obj)
        try:
            adapter.apply(obj, config, handle)
            patch_lora_layers(obj, config, handle)
        except Exception:
            handle.undo()  # a failed patch (e.g. ranks that disagree under sp) leaves the model as it was
            raise
        return handle

    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise TypeError(_unsupported(obj))
    supported = {name: c for name, c in components.items() if c is not None and _adapter_for(c) is not None}
    if not supported:
        raise TypeError(_unsupported(obj) + f" (its components: {sorted(k for k, v in components.items() if v is not None)})")
    _warn_unpatched(components, supported)
    handle.mark(obj)
    try:
        for name, component in supported.items():
            handle.children.append(patch(component, config))
    except Exception:
        handle.undo()
        raise
    return handle


def _warn_unpatched(components, supported):
    """A pipeline's diffusers models that no adapter takes (e.g. LTX-2's vocoder) run as diffusers' own: said once
    per class, since the rest of the pipeline is patched (text encoders and schedulers are not diffusers models)."""
    from diffusers import ModelMixin

    for name, c in components.items():
        if isinstance(c, ModelMixin) and name not in supported and type(c) not in _warned_unpatched:
            _warned_unpatched.add(type(c))
            warnings.warn(f"vkern.patch: left the pipeline's {name} ({type(c).__name__}) unpatched: no vkern adapter "
                          "for it (it runs as diffusers' own)", stacklevel=3)


_warned_unpatched = set()


def _adapter_for(obj):
    return next((a for a in ADAPTERS.values() if a.supports(obj)), None)


def supported_models():
    """{family: the diffusers model classes its adapter takes}."""
    return {name: adapter.MODELS for name, adapter in ADAPTERS.items()}


def _unsupported(obj):
    models = ", ".join(m for ms in supported_models().values() for m in ms)
    return (f"vkern.patch: unsupported object {type(obj).__name__}; supported: WanPipeline (and other "
            f"pipelines with these components), {models}")


def _require_diffusers():
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise ImportError("vkern.patch needs diffusers: pip install 'vkern[diffusers]'") from err


__all__ = ["patch", "PatchConfig", "PatchHandle", "patched_handle", "SPConfig", "supported_models"]
