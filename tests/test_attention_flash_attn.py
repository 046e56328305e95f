"""flash-attn as an attention backend (vkern/ops/flash_attn_backend.py) and the "vkern" preference.

flash-attn is not installable on the CI or GPU machines, so the CPU tests run the adapter against stand-ins that
follow the documented contract of flash_attn_func (FA2: out, or (out, lse, S_dmask) with return_attn_probs; FA3:
out or (out, lse)), computed by vkern's reference. The GPU test runs the real package where it is installed."""
import sys
import types
import warnings

import pytest
import torch

import vkern.ops
from tests.attention_helpers import torch_attention
from tests.tolerance import assert_within_torch_error
from vkern.ops import _backend, flash_attn_backend, fused_attention
from vkern.reference import attention as ref

CUDA = torch.device("cuda")


def fake_flash_attn_func(style, calls, lse_shape=None):
    """A flash_attn_func with the return convention of `style`: "fa2", "fa3", or "fa3-first" (FA3's first release:
    no return_attn_probs, always (out, lse)); records each call's arguments."""
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False):
        assert all(t.stride(-1) == 1 for t in (q, k, v)), "flash-attn needs the head dim contiguous"
        assert not causal and (softmax_scale is None or softmax_scale > 0)
        calls.append(dict(scale=softmax_scale, lse=return_attn_probs, shapes=[t.shape for t in (q, k, v)]))
        out, lse = ref.attention_lse(q, k, v, None, softmax_scale, dtype=torch.float32)
        out = out.to(q.dtype)
        lse = lse.float() if lse_shape is None else lse.float().reshape(lse_shape)
        if style == "fa2":
            return (out, lse, None) if return_attn_probs else out
        return (out, lse) if return_attn_probs or style == "fa3-first" else out

    if style == "fa3-first":
        def first_release(q, k, v, softmax_scale=None, causal=False):
            return flash_attn_func(q, k, v, softmax_scale, causal)
        return first_release
    return flash_attn_func


@pytest.fixture
def installed(monkeypatch):
    """installed(fa2=style or None, fa3=...): puts stand-in modules where `import flash_attn` / `import
    flash_attn_interface` find them (None: not installed); returns the list of recorded calls."""
    calls = []

    def install(fa2="fa2", fa3=None, lse_shape=None):
        for name, style in (("flash_attn", fa2), ("flash_attn_interface", fa3)):
            if style is None:
                monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError
            else:
                module = types.ModuleType(name)
                module.flash_attn_func = fake_flash_attn_func(style, calls, lse_shape)
                monkeypatch.setitem(sys.modules, name, module)
        flash_attn_backend._load.cache_clear()
        return calls

    yield install
    flash_attn_backend._load.cache_clear()


@pytest.fixture
def capability(monkeypatch):
    """set_capability(cc): a CUDA GPU of compute capability cc, as far as flash_attn_backend can tell."""
    def set_capability(cc):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    return set_capability


@pytest.mark.parametrize("fa2,fa3,cc,expected", [
    ("fa2", None, (9, 0), "flash_attn"), ("fa2", "fa3", (9, 0), "flash_attn_interface"),
    ("fa2", "fa3", (8, 0), "flash_attn"), (None, "fa3", (9, 0), "flash_attn_interface"),
    (None, "fa3", (8, 6), "flash_attn_interface does not run on sm_86"), ("fa2", None, (7, 5), "sm_75"),
    (None, None, (9, 0), "flash-attn is not installed")])
def test_implementation_per_install_and_gpu(installed, capability, fa2, fa3, cc, expected):
    """FA3's Hopper build on sm_90, FA2 on sm_80 and newer; otherwise a reason that says which and why."""
    installed(fa2, fa3)
    capability(cc)
    module, fn = flash_attn_backend.implementation(CUDA)
    if expected.startswith("flash_attn") and " " not in expected:
        assert module == expected and callable(fn)
    else:
        assert module is None and expected in fn, fn


@pytest.mark.parametrize("device,dtype,D,Dv,masked,kv_len,why", [
    (CUDA, torch.bfloat16, 128, 128, False, 4096, None), (CUDA, torch.float16, 72, 72, False, None, None),
    (torch.device("cpu"), torch.bfloat16, 128, 128, False, 4096, "needs a CUDA tensor"),
    (CUDA, torch.float32, 128, 128, False, 4096, "no torch.float32 kernel"),
    (CUDA, torch.bfloat16, 100, 100, False, 4096, "a multiple of 8"),
    (CUDA, torch.bfloat16, 512, 512, False, 4096, "at most 256"),
    (CUDA, torch.bfloat16, 128, 64, False, 4096, "head dims 128/64"),
    (CUDA, torch.bfloat16, 128, 128, True, 4096, "a mask"),
    (CUDA, torch.bfloat16, 128, 128, False, 0, "no keys")])
def test_reason(installed, capability, device, dtype, D, Dv, masked, kv_len, why):
    installed("fa2")
    capability((9, 0))
    got = flash_attn_backend.reason(device, dtype, D, Dv, masked, kv_len)
    assert (got is None) if why is None else (why in got), got


@pytest.mark.parametrize("head_dim,kv_len,order", [
    (128, 32760, ["cuda", "sdpa", "triton", "flash_attn", "reference"]),
    (128, 512, ["sdpa", "cuda", "triton", "flash_attn", "reference"]),
    (64, 7392, ["cuda", "sdpa", "triton", "flash_attn", "reference"]),
    (96, 32760, ["sdpa", "flash_attn", "triton", "cuda", "reference"])])
def test_auto_ranks_flash_attn_after_the_measured_backends(installed, capability, monkeypatch, head_dim, kv_len,
                                                           order):
    """Unmeasured here, flash-attn follows vkern's kernels and cuDNN (and, at head dims vkern's kernels do not
    take, cuDNN alone); it is a candidate with a reason of its own whether or not it can run."""
    installed("fa2")
    capability((9, 0))
    monkeypatch.setattr(fused_attention, "_cuda_kernel_reason", lambda *args: None)
    cands = fused_attention._attention_candidates(CUDA, torch.bfloat16, head_dim=head_dim, kv_len=kv_len)
    assert list(cands) == order and cands["flash_attn"] is None
    installed(None, None)
    cands = fused_attention._attention_candidates(CUDA, torch.bfloat16, head_dim=head_dim, kv_len=kv_len)
    assert cands["flash_attn"] == "flash-attn is not installed"


def pretend_usable_on_cpu(monkeypatch):
    """Lets the adapter run on CPU tensors: flash-attn's reason says yes and its implementation is the stand-in."""
    monkeypatch.setattr(flash_attn_backend, "reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(flash_attn_backend, "implementation",
                        lambda device: ("flash_attn", flash_attn_backend._load("flash_attn")))


@pytest.mark.parametrize("style", ["fa2", "fa3", "fa3-first"])
@pytest.mark.parametrize("scale", [None, 0.2, -0.3, 0.0])
def test_backend_flash_attn_runs_the_package(installed, monkeypatch, style, scale):
    """backend="flash_attn" hands the call to flash_attn_func as it is documented (vkern's [B, S, H, D] layout,
    the head dim made contiguous, a non-positive scale folded into q as for vkern's kernels) and returns its out
    and lse: equal to the reference's."""
    calls = installed(style)
    pretend_usable_on_cpu(monkeypatch)
    q = torch.randn(2, 113, 3, 64 * 2)[..., ::2]  # head dim strided: must be copied
    k, v = torch.randn(2, 77, 3, 64), torch.randn(2, 77, 3, 64)
    out, lse = vkern.ops.attention(q, k, v, scale=scale, return_lse=True, backend="flash_attn")
    assert _backend.last_choice["attention"] == "flash_attn" and len(calls) == 1
    assert calls[0]["lse"] or style == "fa3-first"
    assert calls[0]["scale"] == (None if scale is None else abs(scale) or 1.0)
    expected_out, expected_lse = ref.attention_lse(q.double(), k.double(), v.double(), None, scale,
                                                   dtype=torch.float64)
    torch.testing.assert_close(out, expected_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, expected_lse.float(), rtol=1e-5, atol=1e-5)
    out_only = vkern.ops.attention(q, k, v, scale=scale, backend="flash_attn")
    assert not calls[1]["lse"] and isinstance(out_only, torch.Tensor) and torch.equal(out_only, out)


def test_backend_flash_attn_checks_the_lse_it_gets(installed, monkeypatch):
    """An lse laid out otherwise than [B, H, Sq] (another flash-attn version's convention) is an error, not a
    silently wrong merge in ring attention."""
    installed("fa2", lse_shape=(2 * 3 * 113,))
    pretend_usable_on_cpu(monkeypatch)
    q, k, v = (torch.randn(2, 113, 3, 64) for _ in range(3))
    with pytest.raises(RuntimeError, match=r"lse \(678,\).*expects \(2, 3, 113\)"):
        vkern.ops.attention(q, k, v, return_lse=True, backend="flash_attn")


def test_backend_flash_attn_without_an_lse_is_an_error(monkeypatch):
    """A flash_attn_func that returns out alone when vkern asked for the lse: an error naming the module."""
    monkeypatch.setattr(flash_attn_backend, "reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(flash_attn_backend, "implementation",
                        lambda device: ("flash_attn", lambda q, k, v, softmax_scale=None, causal=False: q.clone()))
    q = torch.randn(1, 9, 2, 64)
    with pytest.raises(RuntimeError, match="flash_attn.flash_attn_func returned no lse"):
        vkern.ops.attention(q, q, q, return_lse=True, backend="flash_attn")
    assert torch.equal(vkern.ops.attention(q, q, q, backend="flash_attn"), q)


def test_backend_flash_attn_not_installed_falls_back_with_a_warning(installed, capability, monkeypatch):
    """Preferring flash-attn where it cannot run gives auto's choice and one warning saying why."""
    installed(None, None)
    monkeypatch.setattr(flash_attn_backend, "reason", lambda *args, **kwargs: "flash-attn is not installed")
    q, k, v = (torch.randn(1, 33, 2, 64) for _ in range(3))
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="flash-attn is not installed"):
        out = vkern.ops.attention(q, k, v, backend="flash_attn")
    assert _backend.last_choice["attention"] == "reference"
    torch.testing.assert_close(out, ref.attention(q, k, v))


def test_backend_vkern_runs_vkern_kernels_without_warning():
    """backend="vkern" (PatchConfig(attention="bf16")): the CUDA kernel where it can take the call, else the Triton
    kernel, the step between them not warned about (here on the CPU: Triton under the interpreter)."""
    q, k, v = (torch.randn(1, 130, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    _backend._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = vkern.ops.attention(q, k, v, backend="vkern")
    assert not [w for w in caught if "vkern" in str(w.message)], [str(w.message) for w in caught]
    assert _backend.last_choice["attention"] == "triton"
    assert_within_torch_error(out, ref.attention(q.double(), k.double(), v.double()), torch_attention(q, k, v))


def test_backend_vkern_prefers_the_cuda_kernel(monkeypatch):
    """Where the CUDA kernel can take the call, "vkern" puts it first even below CUDA_MIN_KEYS keys, where auto
    puts cuDNN first."""
    seen = {}

    def choose(op, candidates):
        seen["order"] = list(candidates)
        return "reference"

    monkeypatch.setattr(fused_attention, "_attention_candidates",
                        lambda *args: {"sdpa": None, "cuda": None, "triton": None, "flash_attn": "x",
                                       "reference": None})
    monkeypatch.setattr(_backend, "choose", choose)
    q, k, v = (torch.randn(1, 16, 2, 64) for _ in range(3))
    vkern.ops.attention(q, k, v, backend="vkern")
    assert seen["order"][0] == "cuda"
    vkern.ops.attention(q, k, v)
    assert seen["order"][0] == "sdpa"


def test_unknown_backend_is_an_error():
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match="backend: expected one of .*'vkern'.*'flash_attn'"):
        vkern.ops.attention(q, q, q, backend="fa3")


def test_info_shows_the_attention_choice_per_shape_class_and_flash_attn():
    result = vkern.info(print_=False)
    assert "flash-attn" in result
    classes = result["attention"]
    assert {"D 128, < 8192 keys", "D 128, >= 8192 keys", "D 64, >= 4096 keys", "D 96 (other head dims)"} <= set(classes)
    if not torch.cuda.is_available():
        assert set(classes.values()) == {"reference"}


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_flash_attn_package_within_twice_torch_error(D):
    """The real package where it is installed (not on vkern's GPU machine so far: then this skips, saying so)."""
    reason = flash_attn_backend.reason(CUDA, torch.bfloat16, D, D, False, 1000)
    if reason is not None:
        pytest.skip(f"flash-attn cannot run here: {reason}")
    q = torch.randn(2, 1000, 4, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 777, 4, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = vkern.ops.attention(q, k, v, return_lse=True, backend="flash_attn")
    assert _backend.last_choice["attention"] == "flash_attn"
    oracle, oracle_lse = ref.attention_lse(q.double(), k.double(), v.double(), None, None, dtype=torch.float64)
    assert_within_torch_error(out, oracle, torch_attention(q, k, v))
    torch.testing.assert_close(lse.double(), oracle_lse, rtol=1e-5, atol=1e-4)
