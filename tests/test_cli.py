"""python -m vkern info / demo, and vkern.info()."""
import subprocess
import sys

import pytest
import torch

import vkern
from vkern import demo


def test_info_lists_versions_build_and_backends():
    result = vkern.info(print_=False)
    assert result["torch"] == torch.__version__
    assert set(result["backends"]) >= {"attention", "qk_norm_rope", "fp8_quantize", "causal_conv3d"}
    if not torch.cuda.is_available():
        assert result["backends"]["attention"] == "reference"


def test_info_shows_the_wan_vae_decode_defaults(monkeypatch):
    for name in ("VKERN_WAN_VAE_FRAMES_PER_STEP", "VKERN_WAN_VAE_LATENTS_PER_CALL"):
        monkeypatch.delenv(name, raising=False)
    assert vkern.info(print_=False)["wan vae decode"] == (
        "2 latent frames per call; the last stages' steps: 16-bit whole chunks, fp32 2 frames, 1 frame above 524288 "
        "pixels a frame")
    monkeypatch.setenv("VKERN_WAN_VAE_FRAMES_PER_STEP", "all")
    monkeypatch.setenv("VKERN_WAN_VAE_LATENTS_PER_CALL", "1")
    assert vkern.info(print_=False)["wan vae decode"] == (
        "1 latent frame per call; the last stages' steps: 16-bit whole chunks, fp32 whole chunks, whole chunks above "
        "524288 pixels a frame")
    monkeypatch.setenv("VKERN_WAN_VAE_FRAMES_PER_STEP", "0")  # a bad value is shown, not raised
    assert "VKERN_WAN_VAE_FRAMES_PER_STEP: expected a positive int" in vkern.info(print_=False)["wan vae decode"]


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "vkern", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends on" in out.stdout and "vkern._C" in out.stdout


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setenv("VKERN_FP8_QUANTIZE_BACKEND", "cuda")
    if torch.cuda.is_available():
        pytest.skip("the cuda backend can run here")
    with pytest.raises(RuntimeError, match="backend 'cuda' forced by the environment cannot run"):
        vkern.ops.fp8_quantize(torch.randn(4, 4))
    monkeypatch.setenv("VKERN_FP8_QUANTIZE_BACKEND", "tpu")
    with pytest.raises(RuntimeError, match="expected one of"):
        vkern.ops.fp8_quantize(torch.randn(4, 4))


def test_demo_tiny_runs_and_matches_unpatched(capsys):
    rows = demo.run("tiny", device="cpu", repeats=1)
    assert [r[0] for r in rows] == ["transformer step", "vae decode"]
    assert all(r[2] < 1e-5 for r in rows), rows  # fp32 on the CPU
    out = capsys.readouterr().out
    assert "backends: " in out and "qk_norm_rope=" in out and "layernorm_modulate=" in out


def test_demo_real_size_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        demo.run("1.3b", device="cpu")


@pytest.mark.parametrize("kwargs, match", [(dict(res="480p", device="cpu"), "needs a CUDA GPU"),
                                           (dict(device="foo"), "--device: "),
                                           pytest.param(dict(device="cuda"), "no CUDA device", marks=pytest.mark.skipif(
                                               torch.cuda.is_available(), reason="CUDA is available here"))])
def test_demo_refuses_what_it_cannot_run_with_a_message(kwargs, match):
    with pytest.raises(SystemExit, match=match):
        demo.run("tiny", **kwargs)


def test_info_reports_a_forced_backend_that_calls_would_reject(monkeypatch):
    monkeypatch.setenv("VKERN_ATTENTION_BACKEND", "bogus")
    assert vkern.info(print_=False)["backends"]["attention"].startswith("bogus (forced, unknown")


def test_unknown_global_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("VKERN_BACKEND", "refrence")
    with pytest.raises(RuntimeError, match="VKERN_BACKEND='refrence': no op has that backend; expected one of"):
        vkern.ops.fp8_quantize(torch.randn(4, 4))
    monkeypatch.setenv("VKERN_BACKEND", "reference")
    vkern.ops.fp8_quantize(torch.randn(4, 4))


def test_info_names_the_cuda_kernels_tile(monkeypatch):
    """Where auto would run the CUDA kernel, info's shape classes say which key tile it takes (from
    FLASH_WIDE_MIN_KEYS[head dim] keys 176 at head dim 128, 224 at 64; else 128)."""
    import importlib

    info_mod = importlib.import_module("vkern.info")  # (vkern.info is also the function)
    from vkern.ops import _backend

    monkeypatch.delenv("VKERN_FLASH_KEYS", raising=False)
    monkeypatch.setattr(_backend, "would_choose_from", lambda op, cands: "cuda")
    classes = info_mod.attention_by_shape_class(torch.device("cpu"))
    assert classes["D 128, >= 8192 keys"] == classes["D 128, with lse"] == "cuda (128x176 tiles)"
    assert classes["D 128, < 8192 keys"] == "cuda (128x128 tiles)"
    assert classes["D 64, >= 4096 keys"] == classes["D 64, with lse"] == "cuda (128x224 tiles)"
    assert classes["D 64, < 4096 keys"] == "cuda (128x128 tiles)"
    assert classes["D 96 (other head dims)"] == "cuda"
