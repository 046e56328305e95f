"""Drop-in for diffusers' WanCausalConv3d, calling vkern.ops.causal_conv3d."""
import torch.nn as nn

from .. import ops


class CachedCausalConv3d(nn.Module):
    """Causal 3D conv with a feature cache: forward(x, cache_x=None) as WanCausalConv3d.forward.
    Holds the original module's weight and bias Parameters (the same objects, not copies), so
    swapping it in costs no memory and undoing the swap restores nothing but the module.
    padding: (frames in front, rows above and below, columns left and right)."""

    def __init__(self, weight, bias, stride, padding, pad_mode="zeros"):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.stride = tuple(stride)
        self.causal_padding = tuple(padding)
        self.pad_mode = pad_mode

    @classmethod
    def from_wan(cls, conv):
        w_pad, _, h_pad, _, t_pad, _ = conv._padding  # Wan's F.pad tuple; its nn.Conv3d padding is (0, 0, 0)
        return cls(conv.weight, conv.bias, conv.stride, (t_pad, h_pad, w_pad))

    def forward(self, x, cache_x=None):
        if cache_x is not None:
            cache_x = cache_x.to(x.device)  # as Wan does: the cache may have been offloaded
        return ops.causal_conv3d(x, self.weight, self.bias, self.stride, self.causal_padding, cache_x, self.pad_mode)

    def extra_repr(self):
        o, c, *k = self.weight.shape
        return (f"{c}, {o}, kernel_size={tuple(k)}, stride={self.stride}, padding={self.causal_padding}, "
                f"pad_mode={self.pad_mode!r}")
