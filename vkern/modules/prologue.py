"""The families' q/k prologues through vkern.ops.qk_norm_rope: which norms the kernel computes as diffusers' do."""
import torch


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
