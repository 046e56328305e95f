"""bench.bench's VAE accuracy columns on the CPU: the fp32 oracle (an fp32 copy of the bf16 VAE, input
upcast) and the streamed error against it, for diffusers' bf16 decode and encode and vkern's."""
import pytest
import torch

from bench import bench
from vkern import models
from vkern.modules import wan_vae

from .tolerance import rel_l2


@torch.no_grad()
def test_fp32_oracle_and_errors(monkeypatch):
    monkeypatch.setenv("VKERN_RMS_NORM_SILU_BACKEND", "reference")
    vae = models.build_wan_vae("tiny", torch.bfloat16)
    z = torch.randn(models.latent_shape("tiny")).bfloat16()
    decode = lambda v, t: v.decode(t).sample  # noqa: E731
    oracle = bench._vae_fp32_reference(vae, z, decode)
    assert oracle.dtype == torch.float32 and oracle.device.type == "cpu"
    assert all(p.dtype == torch.bfloat16 for p in vae.parameters())  # the copy was upcast, not the VAE
    vae32 = models.build_wan_vae("tiny", torch.float32)
    vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    assert torch.equal(oracle, vae32.decode(z.float()).sample)
    theirs, ours = decode(vae, z), wan_vae.decode(vae, z)
    for out in (theirs, ours):
        err, psnr = bench._errors_vs_fp32(out, oracle, frames=2)  # several frame groups, one partial
        assert abs(err - rel_l2(out, oracle)) < 1e-9
        assert abs(psnr - bench._psnr(out, oracle)) < 1e-6
        assert 0 < err < 0.05  # bf16's own error, not a wrong oracle
    assert bench._errors_vs_fp32(oracle, oracle)[0] == 0
    x = torch.rand(1, 3, 9, 32, 32).bfloat16() * 2 - 1
    encode = lambda v, t: v.encode(t).latent_dist.parameters  # noqa: E731
    oracle = bench._vae_fp32_reference(vae, x, encode)
    assert torch.equal(oracle, vae32.encode(x.float()).latent_dist.parameters)
    monkeypatch.setenv("VKERN_BENCH_VAE_FP32", "0")
    assert bench._vae_fp32_reference(vae, x, encode) is None


def test_float32_is_for_vae_convs_only():
    """--dtype float32 times an fp32 VAE's convs (vae-conv); the other ops' kernels take 16-bit inputs."""
    with pytest.raises(SystemExit, match="vae-conv only"):
        bench.main(["--op", "attention", "--dtype", "float32"])
