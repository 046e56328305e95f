"""HunyuanVideo's own checks (the ones every family passes are in test_model_families.py): the joint attention's
masks (key-padding forms, per batch row, a general mask), the 8-bit modes within issue #3's bound on it, and its
processor under torch.compile."""
import warnings

import pytest
import torch
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

import vkern
from vkern import models
from vkern.modules import attention_modes
from vkern.modules.hunyuan_attention import VkernHunyuanVideoAttnProcessor
from vkern.reference.attention import key_padding

from .tolerance import rel_l2

# Head dim 128 (rope axes summing to it), so on a GPU the kernels' D = 128 paths run, the masked CUDA one included.
D128 = dict(attention_head_dim=128, rope_axes_dim=(16, 56, 56))


def build(dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)
    return models.build_hunyuan_transformer("tiny", dtype, device, **overrides)


def forward(model, inputs):
    with torch.inference_mode():
        return model(**inputs).sample


def joint_attention_inputs(dtype, device, video=300, text=40, real=29, dim=256):
    """One dual-stream block's attention (head dim 128) and its inputs: video tokens with RoPE, padded text."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTransformerBlock

    torch.manual_seed(1)
    block = HunyuanVideoTransformerBlock(dim // 128, 128, mlp_ratio=1.0, qk_norm="rms_norm").to(device, dtype).eval()
    x = torch.randn(1, video, dim, device=device, dtype=dtype)
    text_states = torch.randn(1, text, dim, device=device, dtype=dtype)
    angles = torch.randn(video, 128, device=device)
    rope = (angles.cos(), angles.sin())
    mask = torch.ones(1, 1, 1, video + text, dtype=torch.bool, device=device)
    mask[..., video + real:] = False
    return block.attn, (x, text_states, mask, rope)


def run_processor(attn, processor, args):
    with torch.inference_mode():
        return torch.cat(processor(attn, *args), dim=1)


@pytest.mark.parametrize("mode", ["int8pv", "int8"])
def test_8bit_joint_attention_meets_issue_3_bound(mode, device):
    """Issue #3's accuracy bound (cos >= 0.9995, rel L2 <= 0.02 vs fp32) on the joint attention with padded text,
    the attention output before the projections' rounding (to_out is an identity map here)."""
    attn, args = joint_attention_inputs(torch.bfloat16, device)
    with torch.no_grad():
        for linear in (attn.to_out[0], attn.to_add_out):
            linear.weight.copy_(torch.eye(linear.weight.shape[0]))
            linear.bias.zero_()
    oracle = run_processor(attn.double(), HunyuanVideoAttnProcessor2_0(),
                           [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args[:3]]
                           + [tuple(t.double() for t in args[3])])
    attn.bfloat16()
    ours = run_processor(attn, VkernHunyuanVideoAttnProcessor(mode), args)
    cos = torch.nn.functional.cosine_similarity(ours.double().flatten(), oracle.flatten(), dim=0).item()
    assert cos >= 0.9995 and rel_l2(ours, oracle) <= 0.02, (cos, rel_l2(ours, oracle))


def test_processor_under_compile_fullgraph():
    attn, args = joint_attention_inputs(torch.float32, "cpu")
    attn.set_processor(VkernHunyuanVideoAttnProcessor())
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = torch.cat(compiled(args[0], args[1], args[2], image_rotary_emb=args[3]), dim=1)
    expected = run_processor(attn, HunyuanVideoAttnProcessor2_0(), args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_key_padding_forms():
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(key_padding(mask[:, None, None], 2, 3), mask.expand(2, 3))
    assert torch.equal(key_padding(mask, 1, 3), mask)
    assert key_padding(None, 1, 3) is None
    assert key_padding(mask.float()[:, None, None], 1, 3) is None  # additive: a general SDPA mask
    assert key_padding(torch.ones(1, 1, 3, 3, dtype=torch.bool), 1, 3) is None  # per query: general


@pytest.mark.parametrize("mode", ["auto", "int8pv"])
def test_general_mask_runs_exact_16_bit_attention(mode, monkeypatch):
    """A mask that is no key-padding mask (here one per query) goes to SDPA as diffusers' does; the 8-bit modes
    have no kernel for it, so they run the same exact attention and say so once."""
    monkeypatch.setattr(attention_modes, "_warned", set())
    attn, (x, text, _, rope) = joint_attention_inputs(torch.float32, "cpu")
    keys = x.shape[1] + text.shape[1]
    per_query = torch.rand(1, 1, keys, keys) > 0.3
    per_query[..., 0] = True
    args = (x, text, per_query, rope)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run_processor(attn, VkernHunyuanVideoAttnProcessor(mode), args)
    torch.testing.assert_close(got, run_processor(attn, HunyuanVideoAttnProcessor2_0(), args), rtol=1e-5, atol=1e-5)
    said = [str(w.message) for w in caught if "has no kernel for a general mask" in str(w.message)]
    assert len(said) == (1 if mode == "int8pv" else 0)


# model -> (builder, inputs): FramePack's model runs the same blocks; with a batch of one it crops the padding off
# the prompt, so only a batch of several prompts reaches the processor with a mask.
MODELS = {"hunyuan": (models.build_hunyuan_transformer, models.hunyuan_transformer_inputs),
          "framepack": (models.build_framepack_transformer, models.framepack_transformer_inputs)}


@pytest.mark.parametrize("mode", ["auto", "int8pv"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batch_rows_keep_their_own_prompt_lengths(name, mode, device, monkeypatch):
    """Two prompts of different lengths in one batch: each row of the patched batch equals that prompt run alone
    (the key-padding mask is per batch row), up to float32 summation order (TF32 off for the patch embedding's conv;
    matmuls are full fp32 by default)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    make, make_inputs = MODELS[name]
    torch.manual_seed(0)
    model = make("tiny", torch.float32, device, **D128)
    batch = make_inputs(model, "tiny", torch.float32, device, batch=2)  # 11 of 16 text tokens real; the second: 4
    batch["encoder_attention_mask"][1, 4:] = 0
    batch["encoder_hidden_states"][1] = torch.randn_like(batch["encoder_hidden_states"][1])
    with vkern.patch(model, vkern.PatchConfig(attention=mode)):
        together = forward(model, batch)
        # (FramePack's frame indices are one set for the whole batch)
        alone = [forward(model, {k: v if k.startswith("indices") else v[i:i + 1] for k, v in batch.items()})
                 for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], alone[i], rtol=1e-4, atol=1e-4)
    assert rel_l2(alone[0], alone[1]) > 1e-3  # the rows differ, so a mask taken from the wrong row would show


@pytest.mark.parametrize("form", ["no norm", "no weight", "bias"])
def test_fused_norm_rope_leaves_other_norms_to_diffusers(form):
    """What the kernel does not compute (no norm, an RMSNorm without weight or with a bias) runs diffusers' ops: the
    result is theirs exactly."""
    from diffusers.models.normalization import RMSNorm

    from vkern.modules.hunyuan_attention import fused_head_norm_rope
    from vkern.reference.hunyuan_attention import _rope_video

    torch.manual_seed(0)
    S, H, D, text = 24, 2, 64, 4
    x = torch.randn(1, S, H * D)
    norm = {"no norm": None, "no weight": RMSNorm(D, eps=1e-6, elementwise_affine=False),
            "bias": RMSNorm(D, eps=1e-6, bias=True)}[form]
    if form == "bias":
        with torch.no_grad():
            norm.bias.normal_()
    angles = torch.rand(S - text, D)
    rope = (angles.cos(), angles.sin())
    y = x.unflatten(2, (H, D))
    want = _rope_video(y if norm is None else norm(y), rope, text)
    assert torch.equal(fused_head_norm_rope(x, norm, H, rope, text), want)
