"""Attention inputs as a Wan model computes them, shared by the fp8 attention tests and
bench/fp8_attention_accuracy.py."""
import torch
from diffusers.models.transformers.transformer_wan import WanAttention

from vkern.models import wan_rope_tables
from vkern.reference import attention as ref


def wan_qkv(B, Sq, dim, heads, dtype, device="cpu", kind="self", text=512):
    """q, k, v as Wan computes them (vkern.reference.attention.wan_attention's steps): a diffusers
    WanAttention with default init and non-trivial norm weights, random hidden states, RMSNorm across
    heads, Wan's RoPE tables (self-attention); cross-attention keys come from `text` context tokens."""
    kwargs = dict(dim=dim, heads=heads, dim_head=dim // heads, eps=1e-6)
    if kind == "cross":
        kwargs["cross_attention_dim_head"] = dim // heads
    with torch.device(device):
        attn = WanAttention(**kwargs).eval()
        x = torch.randn(B, Sq, dim)
        context = x if kind == "self" else torch.randn(B, text, dim)
    with torch.no_grad():
        attn.norm_q.weight.uniform_(0.5, 1.5)
        attn.norm_k.weight.uniform_(0.5, 1.5)
        rope = [t.to(device) for t in wan_rope_tables(Sq, dim // heads)] if kind == "self" else (None, None)
        q = ref.qk_norm_rope(attn.to_q(x), attn.norm_q.weight, 1e-6, heads, *rope)
        k = ref.qk_norm_rope(attn.to_k(context), attn.norm_k.weight, 1e-6, heads, *rope)
        v = attn.to_v(context).unflatten(2, (heads, -1))
    return q.to(dtype), k.to(dtype), v.to(dtype)
