"""Named Wan configurations and random-weight builders (nothing is downloaded), shared by the demo,
the tests and the benchmarks. Shapes follow ../shared/ANCHORS.md."""
import torch

WAN_TRANSFORMERS = {
    # Small enough for CPU CI, with every code path of the real model (RoPE axes, cross-attention).
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16, text_dim=64,
                 freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64),
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                 freq_dim=256, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, ffn_dim=13824, num_layers=40),
}
WAN_VAES = {
    "tiny": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1),
    "default": dict(),
}
# (frames, height, width) of the video; the latent is (1 + (frames - 1) / 4, height / 8, width / 8).
RESOLUTIONS = {"tiny": (9, 32, 32), "480p": (81, 480, 832), "720p": (81, 720, 1280)}
TEXT_TOKENS = 512


def latent_shape(res, channels=16):
    frames, height, width = RESOLUTIONS[res]
    return (1, channels, 1 + (frames - 1) // 4, height // 8, width // 8)


def cast_like_from_pretrained(model, dtype):
    """What from_pretrained(torch_dtype=dtype) leaves: parameters in dtype except those under the
    model's _keep_in_fp32_modules (kept fp32), buffers (Wan's float64 RoPE tables) untouched.
    A plain model.to(dtype) would also round the RoPE tables and the fp32 norms to bf16."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, param in model.named_parameters():
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        param.data = param.data.to(target)
    return model.eval().requires_grad_(False)


def build_wan_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    """overrides: config entries that replace the named size's (e.g. attention_head_dim=128)."""
    from diffusers import WanTransformer3DModel

    with torch.device(device):
        model = WanTransformer3DModel(**{**WAN_TRANSFORMERS[size], **overrides})
    return cast_like_from_pretrained(model, dtype)


# Wan VACE (diffusers WanVACETransformer3DModel): a Wan transformer plus VACE blocks whose hints are added after the
# main blocks listed here, fed control latents of 96 channels (the released 1.3B and 14B configs, diffusers'
# scripts/convert_wan_to_diffusers.py).
WAN_VACE_LAYERS = {"tiny": [0, 1], "1.3b": list(range(0, 30, 2)), "14b": list(range(0, 40, 5))}


def build_wan_vace_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    """WAN_TRANSFORMERS[size] with VACE layers WAN_VACE_LAYERS[size]; overrides replace config entries."""
    config = {**WAN_TRANSFORMERS[size], "vace_layers": WAN_VACE_LAYERS[size], "vace_in_channels": 96, **overrides}
    return _build("WanVACETransformer3DModel", config, dtype, device)


def wan_vace_transformer_inputs(model, res, dtype, device, batch=1):
    """transformer_inputs plus control_hidden_states: vace_in_channels at the latent's frames, height and width."""
    inputs = transformer_inputs(model, res, dtype, device, batch)
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (batch, model.config.vace_in_channels, *inputs["hidden_states"].shape[2:])
    return {**inputs, "control_hidden_states": torch.randn(shape, generator=g).to(device, dtype)}


def _build(class_name, config, dtype, device):
    """diffusers' model class_name with random weights from config, built on `device`, cast as from_pretrained does."""
    import diffusers

    with torch.device(device):
        model = getattr(diffusers, class_name)(**config)
    return cast_like_from_pretrained(model, dtype)


def prompt_mask(batch, tokens, real, device):
    """A tokenizer's attention mask for a prompt padded to `tokens`: the first `real` are 1, the rest 0 (int64)."""
    mask = torch.zeros(batch, tokens, dtype=torch.int64)
    mask[:, :real] = 1
    return mask.to(device)


def build_wan_vae(size, dtype=torch.bfloat16, device="cpu"):
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan(**WAN_VAES[size])
    return cast_like_from_pretrained(vae, dtype)


def build_wan_pipeline(size="tiny", vae_size=None, dtype=torch.bfloat16, device="cpu"):
    """A WanPipeline with random weights and no text encoder (pass prompt_embeds)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    vae_size = vae_size or ("tiny" if size == "tiny" else "default")
    return WanPipeline(tokenizer=None, text_encoder=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       vae=build_wan_vae(vae_size, dtype, device),
                       transformer=build_wan_transformer(size, dtype, device))


def wan_rope_tables(tokens, head_dim, batch=1):
    """Real Wan RoPE tables (diffusers WanRotaryPosEmbed; (cos, sin), each [1, tokens, 1, head_dim]) for
    a (T, H, 1) token grid with T * H = tokens and both at most the embedding's 1024 positions."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    T = next(t for t in range(1, tokens + 1) if tokens % t == 0 and tokens // t <= 1024)
    return WanRotaryPosEmbed(head_dim, (1, 2, 2), 1024)(torch.empty(batch, 1, T, 2 * (tokens // T), 2))


def transformer_inputs(model, res, dtype, device, batch=1):
    cfg = model.config
    shape = latent_shape(res, cfg.in_channels)
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn((batch, *shape[1:]), generator=g).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_hidden_states=torch.randn((batch, TEXT_TOKENS if res != "tiny" else 16, cfg.text_dim),
                                          generator=g).to(device, dtype),
    )


# Wan 2.2 TI2V-5B (diffusers WanTransformer3DModel): 24 heads x 128, 30 layers, 48-channel latents of the Wan 2.2 VAE
# (4x in time, 16x in space); WanPipeline(expand_timesteps=True) hands it one timestep per token.
WAN22_TI2V_TRANSFORMERS = {
    "tiny": dict(WAN_TRANSFORMERS["tiny"], in_channels=48, out_channels=48),
    "5b": dict(num_attention_heads=24, attention_head_dim=128, in_channels=48, out_channels=48, text_dim=4096,
               freq_dim=256, ffn_dim=14336, num_layers=30),
}
# latent (frames, height, width): 720p is the model's default 1280x704 at 121 frames (31 x 44 x 80; 27280 tokens)
WAN22_TI2V_LATENTS = {"tiny": (3, 4, 4), "720p": (31, 44, 80)}


def build_wan22_ti2v_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("WanTransformer3DModel", {**WAN22_TI2V_TRANSFORMERS[size], **overrides}, dtype, device)


def wan22_ti2v_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as WanPipeline(expand_timesteps=True) passes them in text-to-video: 48-channel latents and a timestep
    per token (all the same; [B, frames * height / 2 * width / 2])."""
    frames, height, width = WAN22_TI2V_LATENTS[res]
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = frames * (height // 2) * (width // 2)
    return dict(
        hidden_states=torch.randn((batch, model.config.in_channels, frames, height, width),
                                  generator=g).to(device, dtype),
        timestep=torch.full((batch, tokens), 500, device=device),
        encoder_hidden_states=torch.randn((batch, TEXT_TOKENS if res != "tiny" else 16, model.config.text_dim),
                                          generator=g).to(device, dtype),
    )


# HunyuanVideo (diffusers HunyuanVideoTransformer3DModel): "13b" is diffusers' default config, the released model's.
HUNYUAN_TRANSFORMERS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, num_single_layers=2, num_refiner_layers=1,
                 text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(8, 12, 12)),
    "13b": dict(),
}
# (frames, height, width) of the video; latent (1 + (frames - 1) / 4, height / 8, width / 8), 2x2 patches.
HUNYUAN_RESOLUTIONS = {"tiny": (9, 64, 64), "720p": (129, 720, 1280), "720p-33f": (33, 720, 1280)}
HUNYUAN_TEXT_TOKENS = {"tiny": (16, 11), "real": (256, 200)}  # (tokens, of which real: the rest is padding)


def build_hunyuan_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("HunyuanVideoTransformer3DModel", {**HUNYUAN_TRANSFORMERS[size], **overrides}, dtype, device)


def hunyuan_transformer_inputs(model, res, dtype, device, batch=1, text_tokens=None):
    """Inputs as HunyuanVideoPipeline passes them: the prompt's embeddings padded to a fixed length with an
    attention mask (1 = real token; text_tokens: (tokens, real ones), default HUNYUAN_TEXT_TOKENS), pooled CLIP
    embeddings, and the guidance scale x 1000 (the model's guidance embedding)."""
    cfg = model.config
    frames, height, width = HUNYUAN_RESOLUTIONS[res]
    tokens, real = text_tokens or HUNYUAN_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn((batch, cfg.in_channels, 1 + (frames - 1) // 4, height // 8, width // 8),
                                  generator=g).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_hidden_states=torch.randn((batch, tokens, cfg.text_embed_dim), generator=g).to(device, dtype),
        encoder_attention_mask=prompt_mask(batch, tokens, real, device),
        pooled_projections=torch.randn((batch, cfg.pooled_projection_dim), generator=g).to(device, dtype),
        guidance=torch.tensor([6000.0] * batch, device=device, dtype=dtype),
    )


# CogVideoX (diffusers CogVideoXTransformer3DModel): "5b" is CogVideoX-5B's config (48 heads x 64, 42 layers, RoPE).
COGVIDEOX_TRANSFORMERS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=16,
                 text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9,
                 max_text_seq_length=8, use_rotary_positional_embeddings=True),
    "5b": dict(num_attention_heads=48, attention_head_dim=64, num_layers=42, use_rotary_positional_embeddings=True),
}
# CogVideoX 1.5 (THUDM/CogVideoX1.5-5B, text-to-video): CogVideoX-5B's sizes with what diffusers'
# scripts/convert_cogvideox_to_diffusers.py --version 1.5 sets: 2x2x2 patches without bias, sample 300 x 300 (the
# RoPE table the pipeline slices to the video's grid), 81 frames; in_channels 16, ofs_embed_dim None and no learned
# positions (32 and 512 are the I2V model's); max_text_seq_length left at 226, the pipeline's max_sequence_length
# (the model card's 224-token limit is SAT's text_length; without learned positions the model never reads it).
# The tiny one's 20 x 20 sample exceeds its 8 x 8 grid (as 150 x 150 does 48 x 85), so the slice is exercised.
COGVIDEOX15_TRANSFORMERS = {
    "tiny": dict(COGVIDEOX_TRANSFORMERS["tiny"], patch_size_t=2, patch_bias=False, sample_width=20, sample_height=20),
    "5b": dict(COGVIDEOX_TRANSFORMERS["5b"], patch_size_t=2, patch_bias=False, sample_width=300, sample_height=300,
               sample_frames=81),
}
# (frames, height, width); latent (1 + (frames - 1) / 4, height / 8, width / 8), 2x2 patches (1.5: 2x2x2, the latent
# frames padded to even); 226 text tokens. 768p: 1.5's 1360x768 at 81 frames (the official cli_demo's default).
COGVIDEOX_RESOLUTIONS = {"tiny": (9, 128, 128), "480p": (49, 480, 720), "768p": (81, 768, 1360)}


def build_cogvideox_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("CogVideoXTransformer3DModel", {**COGVIDEOX_TRANSFORMERS[size], **overrides}, dtype, device)


def build_cogvideox15_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("CogVideoXTransformer3DModel", {**COGVIDEOX15_TRANSFORMERS[size], **overrides}, dtype, device)


def cogvideox_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as CogVideoXPipeline passes them: latents [B, frames, C, h, w], the T5 embeddings of the prompt
    (max_text_seq_length tokens), and the RoPE tables the pipeline computes for the grid: CogVideoX 1.0's (patch_size_t
    None: the grid resized into the sample size and cropped) or 1.5's (the latent frames padded to a multiple of
    patch_size_t, the sample size's table sliced to the grid)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    frames, height, width = COGVIDEOX_RESOLUTIONS[res]
    latent_frames, h, w = 1 + (frames - 1) // 4, height // 8, width // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    p, p_t = cfg.patch_size, cfg.patch_size_t
    grid = (h // p, w // p)
    if p_t is None:
        crops = get_resize_crop_region_for_grid(grid, cfg.sample_width // p, cfg.sample_height // p)
        rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=grid,
                                       temporal_size=latent_frames, device=device)
    else:
        latent_frames += -latent_frames % p_t  # the pipeline's extra noise frames (dropped before decoding)
        rope = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(latent_frames + p_t - 1) // p_t, grid_type="slice",
                                       max_size=(cfg.sample_height // p, cfg.sample_width // p), device=device)
    return dict(
        hidden_states=torch.randn((batch, latent_frames, cfg.in_channels, h, w), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn((batch, cfg.max_text_seq_length, cfg.text_embed_dim),
                                          generator=g).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        image_rotary_emb=rope,
    )


# LTX-Video (diffusers LTXVideoTransformer3DModel): "2b" is diffusers' default config, LTX-Video 0.9's; "13b" is
# 0.9.7's (and 0.9.8's): 32 heads x 128, 48 layers, prompt width 4096, the rest diffusers' defaults (diffusers'
# scripts/convert_ltx_to_diffusers.py, get_transformer_config("0.9.7")).
LTX_TRANSFORMERS = {
    "tiny": dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
                 num_layers=2, caption_channels=32),
    "2b": dict(),
    "13b": dict(attention_head_dim=128, cross_attention_dim=4096, num_layers=48),
}
# latent (frames, height, width): the VAE compresses 8x in time and 32x in space (512p: 704x512, 161 frames).
LTX_LATENTS = {"tiny": (3, 4, 4), "512p": (21, 16, 22)}
LTX_TEXT_TOKENS = {"tiny": (16, 11), "real": (128, 100)}  # (tokens, of which real)


def build_ltx_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("LTXVideoTransformer3DModel", {**LTX_TRANSFORMERS[size], **overrides}, dtype, device)


def ltx_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as LTXPipeline passes them: packed latents [B, frames * height * width, C], the T5 prompt padded to a
    fixed length with its mask (1 = real), the latent grid and RoPE's interpolation scale (the VAE's 8x time
    compression over 25 fps, its 32x space compression)."""
    cfg = model.config
    frames, height, width = LTX_LATENTS[res]
    tokens, real = LTX_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn((batch, frames * height * width, cfg.in_channels), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn((batch, tokens, cfg.caption_channels), generator=g).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_attention_mask=prompt_mask(batch, tokens, real, device),
        num_frames=frames, height=height, width=width, rope_interpolation_scale=(8 / 25, 32, 32),
    )


# Mochi (diffusers MochiTransformer3DModel): "10b" is diffusers' default config, Mochi-1's.
MOCHI_TRANSFORMERS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, num_layers=2, pooled_projection_dim=32, in_channels=4,
                 text_embed_dim=32, time_embed_dim=16, max_sequence_length=16),
    "10b": dict(),
}
# latent (frames, height, width): the VAE compresses 6x in time and 8x in space (480p: 848x480, 163 frames).
MOCHI_LATENTS = {"tiny": (3, 8, 8), "480p": (28, 60, 106)}
MOCHI_TEXT_TOKENS = {"tiny": (16, 11), "real": (256, 200)}  # (tokens, of which real)


def build_mochi_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    model = _build("MochiTransformer3DModel", {**MOCHI_TRANSFORMERS[size], **overrides}, dtype, device)
    with torch.no_grad():  # diffusers starts its learned RoPE frequencies at 0 (no rotation); a trained model's are not
        model.pos_frequencies.normal_(0.0, 0.5)
    return model


def mochi_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as MochiPipeline passes them: latents [B, C, frames, h, w], the T5 prompt padded to max_sequence_length
    with its mask (1 = real)."""
    cfg = model.config
    frames, height, width = MOCHI_LATENTS[res]
    tokens, real = MOCHI_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    g = torch.Generator(device="cpu").manual_seed(0)
    return dict(
        hidden_states=torch.randn((batch, cfg.in_channels, frames, height, width), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn((batch, tokens, cfg.text_embed_dim), generator=g).to(device, dtype),
        timestep=torch.tensor([500] * batch, device=device),
        encoder_attention_mask=prompt_mask(batch, tokens, real, device),
    )


# HunyuanVideo FramePack (diffusers HunyuanVideoFramepackTransformer3DModel): HunyuanVideo's blocks, with history
# latents (clean, 2x and 4x downsampled) packed in front of the video and a SigLIP image projection in the prompt.
FRAMEPACK_TRANSFORMERS = {
    "tiny": dict(HUNYUAN_TRANSFORMERS["tiny"], image_condition_type=None, has_image_proj=True, image_proj_dim=32,
                 has_clean_x_embedder=True),
    "13b": dict(has_image_proj=True, has_clean_x_embedder=True),
}
# latent (frames, height, width) of the section sampled, and of its clean / 2x / 4x history
# "720p": the pipeline's defaults (720 x 1280, latent_window_size 9: a 33-frame section, 9 latent frames of 90 x 160;
# history sizes [1, 2, 16] of inverted anti-drifting sampling, the start image's latent in front of the 1x history):
# 32400 video tokens + 7200 clean, 920 2x and 960 4x history tokens (the last two padded to their patch).
FRAMEPACK_LATENTS = {"tiny": dict(video=(3, 8, 8), clean=2, history_2x=2, history_4x=4),
                     "720p": dict(video=(9, 90, 160), clean=2, history_2x=2, history_4x=16)}


def build_framepack_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("HunyuanVideoFramepackTransformer3DModel", {**FRAMEPACK_TRANSFORMERS[size], **overrides}, dtype,
                  device)


def framepack_transformer_inputs(model, res, dtype, device, batch=1, text_tokens=None):
    """Inputs as HunyuanVideoFramepackPipeline passes them: the section's latents and its frame indices, the history
    latents with theirs (after the section), the prompt padded with its mask (text_tokens as for HunyuanVideo), pooled
    CLIP embeddings, SigLIP image embeddings and the guidance."""
    cfg = model.config
    sizes = FRAMEPACK_LATENTS[res]
    frames, height, width = sizes["video"]
    tokens, real = text_tokens or HUNYUAN_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def latents(n):
        return torch.randn((batch, cfg.in_channels, n, height, width), generator=g).to(device, dtype)

    def indices(start, n):  # (one set for the whole batch, as the pipeline makes them)
        return torch.arange(start, start + n, device=device)

    history = frames + 1
    return dict(
        hidden_states=latents(frames), timestep=torch.tensor([500] * batch, device=device),
        encoder_hidden_states=torch.randn((batch, tokens, cfg.text_embed_dim), generator=g).to(device, dtype),
        encoder_attention_mask=prompt_mask(batch, tokens, real, device),
        pooled_projections=torch.randn((batch, cfg.pooled_projection_dim), generator=g).to(device, dtype),
        # SigLIP's tokens (so400m-patch14-384 in the released pipeline: 27 x 27)
        image_embeds=torch.randn((batch, 9 if res == "tiny" else 729, cfg.image_proj_dim),
                                 generator=g).to(device, dtype),
        indices_latents=indices(1, frames), guidance=torch.tensor([10000.0] * batch, device=device, dtype=dtype),
        latents_clean=latents(sizes["clean"]), indices_latents_clean=indices(history, sizes["clean"]),
        latents_history_2x=latents(sizes["history_2x"]),
        indices_latents_history_2x=indices(history + sizes["clean"], sizes["history_2x"]),
        latents_history_4x=latents(sizes["history_4x"]),
        indices_latents_history_4x=indices(history + sizes["clean"] + sizes["history_2x"], sizes["history_4x"]),
    )


# HunyuanVideo 1.5 (diffusers HunyuanVideo15Transformer3DModel): "8b" is diffusers' default config, the released 480p
# model's (54 dual-stream blocks, 16 heads x 128, no patching of the 16x-compressed latent).
HUNYUAN15_TRANSFORMERS = {
    "tiny": dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=2,
                 num_refiner_layers=1, text_embed_dim=64, text_embed_2_dim=32, image_embed_dim=32,
                 rope_axes_dim=(8, 12, 12)),
    "8b": dict(),
}
# latent (frames, height, width): the VAE compresses 4x in time and 16x in space (480p: 848x480, 121 frames).
HUNYUAN15_LATENTS = {"tiny": (3, 8, 8), "480p": (31, 30, 53), "720p": (31, 45, 80)}
# (tokens, of which real) of the MLLM prompt, the ByT5 glyph prompt and the SigLIP image (T2V: none real)
HUNYUAN15_TEXT_TOKENS = {"tiny": dict(mllm=(16, 11), byt5=(8, 3), image=4),
                         "real": dict(mllm=(1000, 200), byt5=(256, 0), image=729)}


def build_hunyuan15_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("HunyuanVideo15Transformer3DModel", {**HUNYUAN15_TRANSFORMERS[size], **overrides}, dtype, device)


def hunyuan15_transformer_inputs(model, res, dtype, device, batch=1, text_tokens=None, image=False):
    """Inputs as HunyuanVideo15Pipeline passes them: latents with the condition channels ([noise, condition latents,
    mask]: 2 x C + 1), the MLLM and ByT5 prompts padded with their masks (text_tokens: as HUNYUAN15_TEXT_TOKENS), and
    the image embeddings, zeros for text-to-video (image=False: the model then masks them all)."""
    cfg = model.config
    frames, height, width = HUNYUAN15_LATENTS[res]
    text = text_tokens or HUNYUAN15_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    (mllm, mllm_real), (byt5, byt5_real) = text["mllm"], text["byt5"]
    g = torch.Generator(device="cpu").manual_seed(0)
    image_embeds = torch.randn((batch, text["image"], cfg.image_embed_dim), generator=g)
    return dict(
        hidden_states=torch.randn((batch, cfg.in_channels, frames, height, width), generator=g).to(device, dtype),
        timestep=torch.tensor([500.0] * batch, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn((batch, mllm, cfg.text_embed_dim), generator=g).to(device, dtype),
        encoder_attention_mask=prompt_mask(batch, mllm, mllm_real, device),
        encoder_hidden_states_2=torch.randn((batch, byt5, cfg.text_embed_2_dim), generator=g).to(device, dtype),
        encoder_attention_mask_2=prompt_mask(batch, byt5, byt5_real, device),
        image_embeds=(image_embeds if image else torch.zeros_like(image_embeds)).to(device, dtype),
    )


# SkyReels-V2 (diffusers SkyReelsV2Transformer3DModel): Wan's architecture and sizes ("14b": the 14B models').
SKYREELS_TRANSFORMERS = {"tiny": WAN_TRANSFORMERS["tiny"], "1.3b": WAN_TRANSFORMERS["1.3b"], "14b": WAN_TRANSFORMERS["14b"]}


def build_skyreels_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build("SkyReelsV2Transformer3DModel", {**SKYREELS_TRANSFORMERS[size], **overrides}, dtype, device)


def skyreels_transformer_inputs(model, res, dtype, device, batch=1, diffusion_forcing=False):
    """Wan's inputs (transformer_inputs); diffusion_forcing: one timestep per latent frame, as the diffusion forcing
    pipeline passes them (each frame further along than the next)."""
    inputs = transformer_inputs(model, res, dtype, device, batch)
    if diffusion_forcing:
        frames = inputs["hidden_states"].shape[2] // model.config.patch_size[0]
        steps = torch.linspace(200, 800, frames, device=device).round().long()
        inputs.update(timestep=steps[None].expand(batch, -1), enable_diffusion_forcing=True)
    return inputs


# LTX-2 (diffusers LTX2VideoTransformer3DModel, audio and video): "19b" is the released LTX-2.0's config (48 blocks;
# video 32 heads x 128, audio 32 x 64): diffusers' default but for rope_type "split", which every released checkpoint
# (2.0, 2.3, 2.5) uses (diffusers' scripts/convert_ltx2_to_diffusers.py); before session 44 it was "interleaved".
LTX2_TRANSFORMERS = {
    "tiny": dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
                 audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=16,
                 audio_cross_attention_dim=32, num_layers=2, caption_channels=32, rope_type="split"),
    "19b": dict(rope_type="split"),  # (and "tiny" too, so the family tests run the released form)
}
# latent (frames, height, width) of the video (the VAE compresses 8x in time and 32x in space: 512p is 768x512 at
# 121 frames) and the audio's latent frames (25 per second: 5.04 s)
LTX2_LATENTS = {"tiny": ((3, 4, 4), 10), "512p": ((16, 16, 24), 126)}
LTX2_TEXT_TOKENS = {"tiny": (16, 11), "real": (1024, 200)}  # (tokens, of which real)


def build_ltx2_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    config = {**LTX2_TRANSFORMERS[size], **overrides}
    if size == "tiny":  # the prompt's width after the caption projection is each stream's inner dim
        config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
        config["audio_cross_attention_dim"] = config["audio_num_attention_heads"] * config["audio_attention_head_dim"]
    return _build("LTX2VideoTransformer3DModel", config, dtype, device)


def ltx2_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as LTX2Pipeline passes them: packed video latents [B, frames * height * width, C] and audio latents
    [B, audio frames, C], the prompt's embeddings for each stream, padded, with its mask (1 = real), and the grid."""
    cfg = model.config
    (frames, height, width), audio_frames = LTX2_LATENTS[res]
    tokens, real = LTX2_TEXT_TOKENS["tiny" if res == "tiny" else "real"]
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    mask = prompt_mask(batch, tokens, real, device)
    return dict(
        hidden_states=randn(batch, frames * height * width, cfg.in_channels),
        audio_hidden_states=randn(batch, audio_frames, cfg.audio_in_channels),
        encoder_hidden_states=randn(batch, tokens, cfg.caption_channels),
        audio_encoder_hidden_states=randn(batch, tokens, cfg.caption_channels),
        timestep=torch.tensor([500.0] * batch, device=device), encoder_attention_mask=mask,
        audio_encoder_attention_mask=mask, num_frames=frames, height=height, width=width, audio_num_frames=audio_frames,
    )


# Wan 2.2 Animate (diffusers WanAnimateTransformer3DModel): a tiny config for the tests and the released 14B
# (Wan-AI/Wan2.2-Animate-14B-Diffusers; diffusers' scripts/convert_wan_to_diffusers.py, "Wan2.2-Animate-14B"): Wan-14B
# with I2V's 36 input channels and CLIP image keys, a face motion encoder and a face adapter after every 5th block.
# What the script leaves out is the class's default (motion_encoder_channel_sizes, motion_encoder_batch_size=8).
WAN_ANIMATE_TRANSFORMERS = {
    "tiny": dict(WAN_TRANSFORMERS["tiny"], in_channels=None, latent_channels=4, out_channels=4, image_dim=32,
                 added_kv_proj_dim=64, motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_encoder_size=16,
                 motion_style_dim=16, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
                 face_encoder_num_heads=2, inject_face_latents_blocks=1),  # (added_kv_proj_dim: the inner dim)
    "14b": dict(WAN_TRANSFORMERS["14b"], in_channels=36, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
                motion_encoder_size=512, motion_style_dim=512, motion_dim=20, motion_encoder_dim=512,
                face_encoder_hidden_dim=1024, face_encoder_num_heads=4, inject_face_latents_blocks=5),
}
# One segment of WanAnimatePipeline: (segment frames, height, width) of the video. The transformer gets the reference
# frame + 1 + (frames - 1) / 4 latent frames at height / 8 x width / 8, and the segment's face frames at the motion
# encoder's size. 720p: the pipeline's defaults, 77 frames at 1280x720 (21 x 45 x 80 = 75600 tokens).
WAN_ANIMATE_RESOLUTIONS = {"720p": (77, 720, 1280)}
CLIP_IMAGE_TOKENS = 257  # CLIP ViT-H/14's penultimate hidden states at 224 px: 16 x 16 patches + the class token


def _build_with_image_keys(cls_name, configs, size, dtype, device, overrides):
    """A Wan-family model with CLIP image keys (added key/value projections) from configs[size] and overrides."""
    config = {**configs[size], **overrides}
    if size == "tiny":  # (the image keys' projection takes the image embedder's output, the inner dim wide)
        config["added_kv_proj_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    return _build(cls_name, config, dtype, device)


def build_wan_animate_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build_with_image_keys("WanAnimateTransformer3DModel", WAN_ANIMATE_TRANSFORMERS, size, dtype, device,
                                  overrides)


def wan_animate_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as WanAnimatePipeline passes them for a step of one segment: latents with the reference frame and the
    condition channels (2C + 4), the prompt, CLIP image embeddings, pose latents of the segment's frames and the face
    video at the motion encoder's size (WAN_ANIMATE_RESOLUTIONS)."""
    cfg = model.config
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    if res == "tiny":  # the reference frame + 2; 8 face frames (the pipeline's would be 5: the same 2 + 1 face tokens)
        (frames, h, w), face_frames, text, image = (3, 4, 4), 8, 16, 5
    else:
        segment, height, width = WAN_ANIMATE_RESOLUTIONS[res]
        frames, h, w, face_frames = 2 + (segment - 1) // 4, height // 8, width // 8, segment
        text, image = TEXT_TOKENS, CLIP_IMAGE_TOKENS
    face = cfg.motion_encoder_size
    return dict(hidden_states=randn(batch, 2 * cfg.latent_channels + 4, frames, h, w),
                timestep=torch.tensor([500] * batch, device=device),
                encoder_hidden_states=randn(batch, text, cfg.text_dim),
                encoder_hidden_states_image=randn(batch, image, cfg.image_dim),
                pose_hidden_states=randn(batch, cfg.latent_channels, frames - 1, h, w),
                face_pixel_values=randn(batch, 3, face_frames, face, face))


# ChronoEdit (diffusers ChronoEditTransformer3DModel): NVIDIA's image editor, Wan 2.1 I2V-14B's architecture (36 input
# channels: 16 noisy latent channels + 4 of the mask + 16 of the condition video's latents; 257 CLIP image tokens
# through added key/value projections) with its own RoPE table. ChronoEditPipeline runs 5 frames (2 latent frames: the
# input image and the edit, temporal positions 0 and rope_temporal_skip_len - 1) or, with temporal reasoning, 29 frames
# (8 latent frames) for the first num_temporal_reasoning_steps, then 2.
CHRONOEDIT_TRANSFORMERS = {
    "tiny": dict(WAN_TRANSFORMERS["tiny"], in_channels=36, image_dim=32),  # (added_kv_proj_dim: the inner dim)
    "14b": dict(WAN_TRANSFORMERS["14b"], in_channels=36, image_dim=1280, added_kv_proj_dim=5120),
}
# latent (frames, height, width): 720p is the pipeline example's 720 * 1280 area at 16:9 (2 x 45 x 80 = 7200 tokens;
# 8 frames with temporal reasoning: 28800); tiny at 2 frames and, for the table's other path, 3
CHRONOEDIT_LATENTS = {"tiny": (2, 8, 8), "tiny-reason": (3, 8, 8), "720p": (2, 90, 160), "720p-reason": (8, 90, 160)}


def build_chronoedit_transformer(size, dtype=torch.bfloat16, device="cpu", **overrides):
    return _build_with_image_keys("ChronoEditTransformer3DModel", CHRONOEDIT_TRANSFORMERS, size, dtype, device,
                                  overrides)


def chronoedit_transformer_inputs(model, res, dtype, device, batch=1):
    """Inputs as ChronoEditPipeline passes them: the latents with the condition channels, the prompt and the input
    image's CLIP embeddings (CHRONOEDIT_LATENTS[res])."""
    cfg = model.config
    frames, height, width = CHRONOEDIT_LATENTS[res]
    text, image = (16, 5) if res.startswith("tiny") else (TEXT_TOKENS, CLIP_IMAGE_TOKENS)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    return dict(hidden_states=randn(batch, cfg.in_channels, frames, height, width),
                timestep=torch.tensor([500] * batch, device=device),
                encoder_hidden_states=randn(batch, text, cfg.text_dim),
                encoder_hidden_states_image=randn(batch, image, cfg.image_dim))
