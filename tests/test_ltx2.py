"""LTX-2's own checks (the ones every family passes are in test_model_families.py): both outputs (video and audio) of
the processor forms LTX-2.0 and 2.3 configure (split RoPE, per-head gates, prompt modulation, spatio-temporal guidance
through the perturbed processor) and its fused block glue, the processors' signatures (LTX2Attention hands a processor only the keywords its
__call__ names), the 8-bit modes within issue #3's bound on the video self-attention, and compile fullgraph."""
import copy
import inspect
import warnings

import pytest
import torch
from diffusers.models.transformers import transformer_ltx2

import vkern
from vkern import models
from vkern.modules.ltx2_attention import VkernLTX2AttnProcessor, VkernLTX2PerturbedAttnProcessor

from .tolerance import assert_within_torch_error, rel_l2

D128 = dict(attention_head_dim=128, audio_attention_head_dim=64)  # the released head dims: the CUDA paths on a GPU
# config changes -> the extra forward arguments they take
FORMS = {
    "ltx2.0": ({}, {}),  # (the tiny config's RoPE is the released checkpoints' split form)
    "interleaved-rope-gated": (dict(rope_type="interleaved", gated_attn=True, audio_gated_attn=True), {}),
    "ltx2.3-prompt-modulation": (dict(cross_attn_mod=True, audio_cross_attn_mod=True), dict(sigma=torch.tensor([0.5]))),
    "stg-half-batch": (dict(perturbed_attn=True), dict(spatio_temporal_guidance_blocks=[1],
                                                       perturbation_mask=torch.tensor([0.0, 1.0]))),
    "stg-all": (dict(perturbed_attn=True), dict(spatio_temporal_guidance_blocks=[0])),
}


def build(dtype=torch.float32, device="cpu", **overrides):
    torch.manual_seed(0)
    return models.build_ltx2_transformer("tiny", dtype, device, **overrides)


def inputs(model, dtype, form, device="cpu"):
    extra = FORMS[form][1]
    batch = 2 if "perturbation_mask" in extra else 1
    x = models.ltx2_transformer_inputs(model, "tiny", dtype, device, batch=batch)
    # (the perturbation mask in the model's dtype: diffusers' torch.lerp takes no other)
    return {**x, **{k: v.to(device, dtype if k == "perturbation_mask" else None) if torch.is_tensor(v) else v
                    for k, v in extra.items()}}


def forward(model, x):
    with torch.inference_mode():
        out = model(**x)
    return out.sample, out.audio_sample


def to16(x):
    return {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "sigma"
            else v for k, v in x.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", list(FORMS))
def test_reference_mode_is_diffusers_bitwise_video_and_audio(form, dtype, monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "reference")  # every op's reference (the fused block glue's too)
    model = build(dtype, **FORMS[form][0])
    x = inputs(model, dtype, form)
    want = forward(model, x)
    patched = copy.deepcopy(model)
    with vkern.patch(patched, vkern.PatchConfig(attention="reference", fused_block=True)) as handle:
        assert handle.summary["LTX-2 attention processor"] == 12
        assert handle.summary["LTX2VideoTransformerBlock.forward -> fused glue"] == 2
        got = forward(patched, x)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("form", list(FORMS))
def test_fused_block_glue_keeps_diffusers_bits(form):
    """The fused block glue's kernels (diffusers' attention and q/k ops, so only the glue differs) round where
    diffusers' bf16 ops round: the same outputs, bar a rare flipped rounding (the RMSNorm's fp32 sum order)."""
    from vkern.ops import _backend

    from .test_block_glue import assert_mostly_bitwise

    model = build(torch.bfloat16, **FORMS[form][0])
    x = to16(inputs(model, torch.float32, form))
    want = forward(model, x)
    with vkern.patch(model, vkern.PatchConfig(attention="reference", fused_qk_norm_rope=False,
                                              fused_block=True)) as handle:
        assert handle.summary["LTX2VideoTransformerBlock.forward -> fused glue"] == 2
        got = forward(model, x)
    assert _backend.last_choice["layernorm_modulate"] == _backend.last_choice["gate_residual"] == "triton"
    for g, w in zip(got, want):
        assert_mostly_bitwise(g, w)


@pytest.mark.parametrize("fused_block", [None, False])  # LTX-2's default (the fused glue), and without it
@pytest.mark.parametrize("form", list(FORMS))
def test_kernels_within_twice_torch_bf16_error_video_and_audio(form, fused_block, device, monkeypatch):
    """Both outputs within 2x torch's bf16 error; every q and k prologue with RoPE tables (2 blocks x the video and
    audio self-attentions and the audio-to-video and video-to-audio cross-attentions x q, k) is one
    ops.qk_norm_rope pass in the model's RoPE form (split, the released checkpoints', or interleaved)."""
    from vkern import ops

    passes = []
    kernel = ops.qk_norm_rope
    def counted(*a, **k):  # (the form of each pass with RoPE tables)
        if len(a) > 4 and a[4] is not None:
            passes.append(k.get("rope_tables"))
        return kernel(*a, **k)

    monkeypatch.setattr(ops, "qk_norm_rope", counted)
    model32 = build(torch.float32, device, **FORMS[form][0], **D128)
    model16 = build(torch.bfloat16, device, **FORMS[form][0], **D128)
    x = inputs(model32, torch.float32, form, device)
    oracle, torch_bf16 = forward(model32, x), forward(model16, to16(x))
    with vkern.patch(model16, vkern.PatchConfig(fused_block=fused_block)) as handle:
        fused = handle.summary.get("LTX2VideoTransformerBlock.forward -> fused glue", 0)
        assert fused == (0 if fused_block is False else 2)
        ours = forward(model16, to16(x))
    if form != "stg-all":  # (there block 0's self-attentions are their values: no q/k prologue)
        assert passes == ["per_element" if model16.config.rope_type == "interleaved" else "split"] * 16, passes
    for what, o, w, t in zip(("video", "audio"), ours, oracle, torch_bf16):
        assert_within_torch_error(o, w, t, what=what)


def test_perturbation_replaces_the_attention_of_the_perturbed_rows_only():
    """STG with perturbation_mask [0, 1]: row 0's block-1 self-attention is its values, row 1's is attention (the
    check can fail: the two rows' inputs are the same, so only the perturbation separates their outputs)."""
    model = build(torch.float32, **FORMS["stg-half-batch"][0])
    x = inputs(model, torch.float32, "stg-half-batch")
    for k in ("hidden_states", "audio_hidden_states", "encoder_hidden_states", "audio_encoder_hidden_states"):
        x[k] = x[k][:1].expand_as(x[k]).contiguous()
    with vkern.patch(model):
        video, audio = forward(model, x)
        unperturbed = forward(model, dict(x, perturbation_mask=torch.ones(2)))[0]
    torch.testing.assert_close(video[1], unperturbed[1], rtol=1e-5, atol=1e-5)
    assert rel_l2(video[0], unperturbed[0]) > 1e-3


def test_processor_signatures_are_diffusers():
    """LTX2Attention.forward filters the keywords by the processor's signature: vkern's must name the same ones."""
    pairs = ((VkernLTX2AttnProcessor, transformer_ltx2.LTX2AudioVideoAttnProcessor),
             (VkernLTX2PerturbedAttnProcessor, transformer_ltx2.LTX2PerturbedAttnProcessor))
    for ours, theirs in pairs:
        assert list(inspect.signature(ours.__call__).parameters) == list(inspect.signature(theirs.__call__).parameters)


def self_attention(dtype, device, tokens=300, heads=2):
    """A video self-attention module at head dim 128 with RoPE tables over its inner dim, and its input."""
    torch.manual_seed(1)
    dim = heads * 128
    attn = transformer_ltx2.LTX2Attention(dim, heads=heads, kv_heads=heads, dim_head=128).to(device, dtype).eval()
    angles = torch.randn(1, tokens, dim // 2, device=device).repeat_interleave(2, -1)
    return attn, torch.randn(1, tokens, dim, device=device, dtype=dtype), (angles.cos(), angles.sin())


@pytest.mark.parametrize("mode", ["int8pv", "int8"])
def test_8bit_video_self_attention_meets_issue_3_bound(mode, device):
    """cos >= 0.9995, rel L2 <= 0.02 vs fp64, before the output projection's rounding (to_out an identity map)."""
    attn, x, rope = self_attention(torch.bfloat16, device)
    with torch.no_grad():
        attn.to_out[0].weight.copy_(torch.eye(attn.to_out[0].weight.shape[0]))
        attn.to_out[0].bias.zero_()
    with torch.inference_mode():
        oracle = transformer_ltx2.LTX2AudioVideoAttnProcessor()(attn.double(), x.double(), None, None,
                                                               tuple(t.double() for t in rope))
        ours = VkernLTX2AttnProcessor(mode)(attn.bfloat16(), x, None, None, rope)
    cos = torch.nn.functional.cosine_similarity(ours.double().flatten(), oracle.flatten(), dim=0).item()
    assert cos >= 0.9995 and rel_l2(ours, oracle) <= 0.02, (cos, rel_l2(ours, oracle))


def test_prompt_mask_in_8bit_modes_runs_exact_attention_said_once(monkeypatch):
    from vkern.modules import attention_modes

    monkeypatch.setattr(attention_modes, "_warned", set())
    model32, model16 = build(torch.float32), build(torch.bfloat16)
    x = inputs(model32, torch.float32, "ltx2.0")
    oracle, torch_bf16 = forward(model32, x), forward(model16, to16(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vkern.patch(model16, vkern.PatchConfig(attention="int8pv")):
            ours = forward(model16, to16(x))
    said = [w for w in caught if "has no kernel for a general mask" in str(w.message)]
    assert len(said) == 1
    cos = torch.nn.functional.cosine_similarity(ours[0].double().flatten(), oracle[0].double().flatten(), dim=0)
    assert cos >= 0.999 and rel_l2(ours[0], oracle[0]) <= 10 * rel_l2(torch_bf16[0], oracle[0])


def test_processor_under_compile_fullgraph():
    attn, x, rope = self_attention(torch.float32, "cpu")
    attn.set_processor(VkernLTX2AttnProcessor())
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        got = compiled(x, query_rotary_emb=rope)
        expected = transformer_ltx2.LTX2AudioVideoAttnProcessor()(attn, x, None, None, rope)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_block_hands_a_hooked_norm_to_diffusers():
    """A hook on one of a block's norms (here one that changes its output): that block runs diffusers' forward, so the
    hook still sees and changes the norm's output."""
    model = build(torch.float32)
    block = model.transformer_blocks[1]
    block.audio_norm3.register_forward_hook(lambda m, args, out: out * 2)
    x = inputs(model, torch.float32, "ltx2.0")
    want = forward(model, x)
    with vkern.patch(model, vkern.PatchConfig(attention="reference", fused_qk_norm_rope=False, fused_block=True)):
        got = forward(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
