"""The families' q/k prologues through vkern.ops.qk_norm_rope: which norms the kernel computes as diffusers' do, and
the joint sequences' two spans (RoPE on one, the norm alone on the other) written into one buffer."""
import torch

from .. import ops


def kernel_rms_norm(norm, dim):
    """norm is diffusers' RMSNorm or MochiRMSNorm, or torch's RMSNorm, over `dim` values with a weight, no bias and a
    set eps: what the kernel computes (fp32 math; one rounding, where diffusers' RMSNorm rounds twice in bf16)."""
    from diffusers.models.normalization import MochiRMSNorm, RMSNorm

    weight = getattr(norm, "weight", None)
    return (isinstance(norm, (RMSNorm, MochiRMSNorm, torch.nn.RMSNorm)) and torch.is_tensor(weight)
            and tuple(weight.shape) == (dim,) and getattr(norm, "bias", None) is None
            and getattr(norm, "eps", None) is not None)


def kernel_layer_norm(norm, dim):
    """norm is torch's LayerNorm over `dim` values with a weight and a bias (CogVideoX's per-head q/k norm)."""
    return (isinstance(norm, torch.nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,)
            and torch.is_tensor(norm.weight) and torch.is_tensor(norm.bias))


def table_pair(rope, shape):
    """rope is a (cos, sin) pair of tensors of `shape` (a tuple, or a set of tuples)."""
    shapes = shape if isinstance(shape, set) else {shape}
    return (isinstance(rope, (tuple, list)) and len(rope) == 2
            and all(torch.is_tensor(t) and tuple(t.shape) in shapes for t in rope))


def norm_rope_spans(x, weight, eps, heads, tables, roped, plain, **norm):
    """x [B, S, heads * D] -> [B, S, heads, D]: one qk_norm_rope pass over the tokens `roped` (a slice) with diffusers'
    apply_rotary_emb tables ([1, tokens, 1, D] views, or () for none), one over the tokens `plain` without, both into
    one buffer; norm: qk_norm_rope's norm and bias (a LayerNorm)."""
    B, S, width = x.shape
    out = x.new_empty((B, S, heads, width // heads))
    if x[:, roped].shape[1]:
        ops.qk_norm_rope(x[:, roped], weight, eps, heads, *tables, out=out[:, roped], rope_tables="per_element", **norm)
    if x[:, plain].shape[1]:
        ops.qk_norm_rope(x[:, plain], weight, eps, heads, out=out[:, plain], **norm)
    return out
