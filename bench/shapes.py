"""Named shapes from ../shared/ANCHORS.md (tokens after VAE and patchify)."""
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    head_dim: int
    tokens: int
    text_tokens: int  # cross-attention keys (Wan) or joint text tokens

    def flops(self, batch=1, kv_tokens=None):
        return 4 * batch * self.heads * self.tokens * (kv_tokens or self.tokens) * self.head_dim


ATTENTION = {
    "wan1.3b-480p": AttentionShape(12, 128, 32760, 512),
    "wan14b-480p": AttentionShape(40, 128, 32760, 512),
    "wan14b-720p": AttentionShape(40, 128, 75600, 512),
    "hunyuan-720p": AttentionShape(24, 128, 118800, 256),
    "hunyuan15-480p": AttentionShape(16, 128, 49290, 1985),
    "cogvideox-5b": AttentionShape(48, 64, 17550, 226),
    "mochi-480p": AttentionShape(24, 128, 44520, 256),
    "ltx-512p": AttentionShape(32, 64, 7392, 128),
    "ltx2-512p": AttentionShape(32, 128, 6144, 1024),
}

# Transformer steps: (model family, vkern.models size, resolution). hunyuan13b-720p-33f: HunyuanVideo's 720p at 33
# frames (9 x 45 x 80 = 32400 video tokens + 256 text, 200 of them real); cogvideox5b-480p: CogVideoX-5B's 49 frames
# at 720x480 (13 x 30 x 45 = 17550 video tokens + 226 text); ltx2b-512p: LTX-Video 0.9's 161 frames at 704x512
# (21 x 16 x 22 = 7392 tokens; the prompt's 128 by cross-attention); mochi10b-480p: Mochi-1's 163 frames at 848x480
# (28 x 30 x 53 = 44520 video tokens + 256 text, 200 real); hunyuan15-8b-480p: HunyuanVideo 1.5's 121 frames at
# 848x480 (31 x 30 x 53 = 49290 video tokens, no patching, + 1985 text: 200 real MLLM tokens, the ByT5 and image ones
# all padding in text-to-video); ltx2-19b-512p: LTX-2's 121 frames at 768x512 (16 x 16 x 24 = 6144 video tokens,
# 126 audio tokens; the prompt's 1024 by cross-attention); wan-vace14b-480p: Wan-14B 480p plus VACE's 8 blocks and
# their 96-channel control latents; framepack13b-720p: one step of a FramePack section at the pipeline's defaults
# (32400 video tokens + 9080 history tokens; 256 text, 200 real, + 729 SigLIP image tokens;
# vkern.models.FRAMEPACK_LATENTS); wan22-ti2v5b-720p: Wan 2.2 TI2V-5B's default 121 frames at 1280x704 (31 x 22 x 40 =
# 27280 tokens, a timestep per token); ltx13b-512p: LTX-Video 0.9.7/0.9.8 13B at the 2B's 512p shape (7392 tokens);
# cogvideox15-5b-768p: CogVideoX 1.5-5B's 81 frames at 1360x768 (21 latent frames padded to 22, 2x2x2 patches:
# 11 x 48 x 85 = 44880 video tokens + 226 text); wan-animate14b-720p: one step of a Wan 2.2 Animate 14B segment at the
# pipeline's defaults, 77 frames at 1280x720 (the reference frame + 20: 21 x 45 x 80 = 75600 tokens; 512 text + 257
# CLIP image keys by cross-attention; 77 face frames at 512x512 through the motion encoder; vkern.models.WAN_ANIMATE_*);
# chronoedit14b-720p: a ChronoEdit-14B edit at 1280x720 (2 latent frames, the input image and the edit: 2 x 45 x 80 =
# 7200 tokens; 512 text + 257 CLIP image keys), -reason: its temporal reasoning steps (8 frames, 28800 tokens).
STEPS = {"wan1.3b-480p": ("wan", "1.3b", "480p"), "wan14b-480p": ("wan", "14b", "480p"),
         "wan14b-720p": ("wan", "14b", "720p"), "hunyuan13b-720p-33f": ("hunyuan", "13b", "720p-33f"),
         "cogvideox5b-480p": ("cogvideox", "5b", "480p"), "ltx2b-512p": ("ltx", "2b", "512p"),
         "mochi10b-480p": ("mochi", "10b", "480p"), "hunyuan15-8b-480p": ("hunyuan15", "8b", "480p"),
         "ltx2-19b-512p": ("ltx2", "19b", "512p"), "skyreels14b-480p": ("skyreels", "14b", "480p"),
         "skyreels14b-480p-df": ("skyreels-df", "14b", "480p"),  # -df: diffusion forcing (a timestep per frame)
         "wan-vace14b-480p": ("wan-vace", "14b", "480p"), "framepack13b-720p": ("framepack", "13b", "720p"),
         "wan22-ti2v5b-720p": ("wan22-ti2v", "5b", "720p"), "ltx13b-512p": ("ltx", "13b", "512p"),
         "cogvideox15-5b-768p": ("cogvideox15", "5b", "768p"), "wan-animate14b-720p": ("wan-animate", "14b", "720p"),
         "chronoedit14b-720p": ("chronoedit", "14b", "720p"),
         "chronoedit14b-720p-reason": ("chronoedit", "14b", "720p-reason")}
# -fp32: the VAE in fp32, as diffusers' Wan examples load it (torch_dtype=torch.float32); the others bf16
VAE = {"wan-vae-480p": "480p", "wan-vae-720p": "720p", "wan-vae-480p-fp32": "480p", "wan-vae-720p-fp32": "720p"}


def vae_dtype(name):
    import torch

    return torch.float32 if name.endswith("-fp32") else torch.bfloat16
