"""Mochi's own checks (the ones every family passes are in test_model_families.py): vkern's one masked call over the
batch gives diffusers' per-row result for any prompt mask (holes, rows of different lengths, both output streams),
the 8-bit modes meet issue #3's bound on its joint attention, and its processor under torch.compile."""
import pytest
import torch
from diffusers.models.attention_processor import MochiAttention, MochiAttnProcessor2_0

from vkern.modules.mochi_attention import VkernMochiAttnProcessor

from .tolerance import rel_l2

DIM, HEADS = 256, 2


def attention(dtype=torch.float32, device="cpu"):
    torch.manual_seed(1)
    attn = MochiAttention(query_dim=DIM, added_kv_proj_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, out_dim=DIM,
                          out_context_dim=DIM, processor=MochiAttnProcessor2_0())
    return attn.to(device, dtype).eval()


def inputs(mask, dtype=torch.float32, device="cpu", video=200):
    g = torch.Generator().manual_seed(2)
    B, T = mask.shape
    x, text = (torch.randn(B, n, DIM, generator=g).to(device, dtype) for n in (video, T))
    angles = torch.randn(video, HEADS, DIM // HEADS // 2, generator=g).to(device)
    return x, text, mask.to(device), (angles.cos(), angles.sin())


def run(attn, processor, args):
    with torch.inference_mode():
        return torch.cat(processor(attn, *args), dim=1)


@pytest.mark.parametrize("mode", ["auto", "sdpa", "bf16"])
def test_any_prompt_mask_gives_diffusers_layout(mode, device):
    mask = torch.zeros(2, 24, dtype=torch.int64)
    mask[0, :17] = 1
    mask[1, [0, 1, 2, 5, 9, 10, 20]] = 1  # holes: diffusers gathers the real tokens to the front
    attn = attention(torch.float32, device)
    args = inputs(mask, torch.float32, device)
    want = run(attn, MochiAttnProcessor2_0(), args)
    got = run(attn, VkernMochiAttnProcessor(mode), args)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # the second row's text outputs past its 7 real tokens: zero attention, so the projection's bias alone
    assert torch.equal(got[1, 200 + 7:], attn.to_add_out.bias.expand(24 - 7, DIM))


@pytest.mark.parametrize("mode", ["int8pv", "int8"])
def test_8bit_joint_attention_meets_issue_3_bound(mode, device):
    """Issue #3's bound (cos >= 0.9995, rel L2 <= 0.02 vs fp32) on the joint attention with a padded prompt, before
    the output projections' rounding (identity maps here)."""
    attn = attention(torch.float64, device)
    with torch.no_grad():
        for linear in (attn.to_out[0], attn.to_add_out):
            linear.weight.copy_(torch.eye(DIM))
            linear.bias.zero_()
    mask = torch.zeros(1, 24, dtype=torch.int64)
    mask[0, :19] = 1
    args = inputs(mask, torch.float64, device)
    oracle = run(attn, MochiAttnProcessor2_0(), [args[0], args[1], args[2], tuple(t.double() for t in args[3])])
    args16 = (args[0].bfloat16(), args[1].bfloat16(), args[2], args[3])
    ours = run(attn.bfloat16(), VkernMochiAttnProcessor(mode), args16)
    cos = torch.nn.functional.cosine_similarity(ours.double().flatten(), oracle.flatten(), dim=0).item()
    assert cos >= 0.9995 and rel_l2(ours, oracle) <= 0.02, (cos, rel_l2(ours, oracle))


def test_processor_under_compile_fullgraph():
    """One masked call has no data-dependent shapes (diffusers' per-row gather of the real tokens has)."""
    mask = torch.zeros(2, 24, dtype=torch.int64)
    mask[0, :17], mask[1, :5] = 1, 1
    attn = attention()
    args = inputs(mask)
    want = run(attn, MochiAttnProcessor2_0(), args)
    attn.processor = VkernMochiAttnProcessor()
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = torch.cat(compiled(args[0], args[1], args[2], image_rotary_emb=args[3]), dim=1)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
