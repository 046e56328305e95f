"""Token-chunked feed-forward: reference vs diffusers' FeedForward, chunked vs unchunked, the op and
the drop-in module (alone and inside a Wan block)."""

import pytest
import torch
from diffusers.models.attention import FeedForward
from diffusers.models.transformers.transformer_wan import WanTransformerBlock
from torch.utils._python_dispatch import TorchDispatchMode

import vkern
from tests.tolerance import assert_within_torch_error, poison, rel_l2
from vkern.modules.feed_forward import ChunkedFeedForward
from vkern.ops import _backend
from vkern.reference import feed_forward as ref

DIM, FFN = 32, 96  # small on purpose: the point is odd token counts and chunk boundaries


def weights(dim=DIM, ffn=FFN, dim_out=DIM, dtype=torch.float32, bias=True):
    w1 = torch.randn(ffn, dim, dtype=dtype) / dim**0.5
    w2 = torch.randn(dim_out, ffn, dtype=dtype) / ffn**0.5
    b1 = torch.randn(ffn, dtype=dtype) if bias else None
    b2 = torch.randn(dim_out, dtype=dtype) if bias else None
    return w1, b1, w2, b2


def ff_weights(ff):
    return ff.net[0].proj.weight, ff.net[0].proj.bias, ff.net[2].weight, ff.net[2].bias


@pytest.fixture
def one_thread():
    # CPU MKL picks its fp32 GEMM path by rows per thread; one thread keeps that choice stable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class MaxIntermediate(TorchDispatchMode):
    """Records the largest tensor produced with last dimension `width` (the FFN intermediate)."""

    def __init__(self, width):
        super().__init__()
        self.width, self.numel = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.width:
                self.numel = max(self.numel, t.numel())
        return out


# --- reference vs diffusers ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_is_diffusers_feed_forward_bitwise(dtype, bias):
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate", bias=bias).to(dtype).eval()
    x = torch.randn(2, 113, DIM, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ref.feed_forward(x, *ff_weights(ff)), ff(x))


# --- chunked vs unchunked --------------------------------------------------------------------------

CHUNKINGS = [(1, 1), (1, 7), (113, 1), (113, 7), (113, 64), (113, 112), (4097, 100), (4097, 4096)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,chunk", CHUNKINGS)
def test_each_chunk_is_the_unchunked_math_bitwise(dtype, tokens, chunk):
    # The chunk loop (row ranges, bias, in-place GELU, writes into out) must be exactly the plain ops
    # on each chunk's rows; the out buffer is poisoned so an unwritten row cannot pass.
    x = torch.randn(tokens, DIM, dtype=dtype)
    w = weights(dtype=dtype)
    out = poison(torch.empty(tokens, DIM, dtype=dtype))
    got = ref.feed_forward(x, *w, chunk_size=chunk, out=out)
    assert got is out
    want = torch.cat([ref.feed_forward(x[s:s + chunk], *w) for s in range(0, tokens, chunk)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,chunk", CHUNKINGS)
def test_chunked_vs_unchunked_within_gemm_rounding(dtype, tokens, chunk):
    # Chunks of a few rows may take another BLAS kernel (another summation order): the chunked
    # result must then be as close to float64 as PyTorch's own unchunked result.
    x = torch.randn(2, tokens, DIM, dtype=dtype)
    w = weights(dtype=dtype)
    oracle = ref.feed_forward(x.double(), *(t.double() for t in w))
    assert_within_torch_error(ref.feed_forward(x, *w, chunk_size=chunk), oracle, ref.feed_forward(x, *w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,chunk", [(113, 48), (4097, 96), (4097, 1000)])
def test_chunked_equals_unchunked_bitwise_when_chunks_are_not_tiny(one_thread, dtype, tokens, chunk):
    # Every chunk here has >= 16 rows, where CPU MKL runs the same GEMM kernel as for all rows.
    x = torch.randn(tokens, DIM, dtype=dtype)
    w = weights(dtype=dtype)
    assert torch.equal(ref.feed_forward(x, *w, chunk_size=chunk), ref.feed_forward(x, *w))


def test_chunked_never_materializes_the_full_intermediate():
    tokens, chunk = 513, 100
    x, w = torch.randn(tokens, DIM), weights()
    probe = MaxIntermediate(FFN)
    with probe:
        ref.feed_forward(x, *w, chunk_size=chunk)
    assert probe.numel == chunk * FFN
    with probe:  # the probe sees the full intermediate when there is one
        ref.feed_forward(x, *w)
    assert probe.numel == tokens * FFN


@pytest.mark.parametrize("tokens,ffn,dtype,budget", [
    (4097, 96, torch.float32, 100_000),    # 260 rows fit -> 256
    (4097, 96, torch.bfloat16, 10_000),    # 52 rows fit, fewer than a multiple of 64
    (113, 96, torch.float32, 10**9),       # everything fits
    (32760, 8960, torch.bfloat16, 2**30),  # Wan 1.3B at 480p
    (1, 13824, torch.float32, 13824 * 4),  # exactly one row
])
def test_chunk_for_budget_respects_the_budget(tokens, ffn, dtype, budget):
    row = ffn * dtype.itemsize
    c = ref.chunk_for_budget(tokens, ffn, dtype, budget)
    assert 1 <= c <= tokens and c * row <= budget
    if c < tokens:  # and it is the largest such chunk, up to the 64-row rounding
        step = ref.CHUNK_MULTIPLE if c >= ref.CHUNK_MULTIPLE else 1
        assert (c + step) * row > budget and (step == 1 or c % step == 0)


def test_chunk_for_budget_rejects_a_budget_below_one_row():
    with pytest.raises(ValueError, match="^budget_bytes:"):
        ref.chunk_for_budget(100, 96, torch.bfloat16, 191)


# --- the op ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 37])
def test_op_is_the_reference(chunk):
    x = torch.randn(3, 50, DIM).transpose(0, 1)  # non-contiguous on purpose
    w = weights(dim_out=24)
    with torch.inference_mode():
        got = vkern.ops.feed_forward(x, *w, chunk_size=chunk)
    assert got.shape == (50, 3, 24)
    assert torch.equal(got, ref.feed_forward(x, *w, chunk_size=chunk))
    assert _backend.last_choice["feed_forward"] == "reference"


@pytest.mark.parametrize("chunk", [None, 37])
def test_op_under_torch_compile_fullgraph(chunk):
    x, w = torch.randn(2, 113, DIM, dtype=torch.bfloat16), weights(dtype=torch.bfloat16)
    compiled = torch.compile(vkern.ops.feed_forward, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(x, *w, chunk_size=chunk), vkern.ops.feed_forward(x, *w, chunk_size=chunk))


def _bad(name, **change):
    return pytest.param(name, change, id=f"{name}-{'-'.join(change)}")


@pytest.mark.parametrize("name,change", [
    _bad("x", x=torch.randint(0, 3, (4, DIM))),
    _bad("x", x=torch.tensor(1.0)),
    _bad("w1", w1=torch.randn(FFN, DIM, dtype=torch.bfloat16)),
    _bad("w1", w1=torch.randn(FFN, DIM + 1)),
    _bad("w1", w1=torch.randn(FFN * DIM)),
    _bad("w1", w1=[[0.0] * DIM] * FFN),
    _bad("b1", b1=torch.randn(FFN + 1)),
    _bad("w2", w2=torch.randn(DIM, FFN - 1)),
    _bad("w2", w2=torch.randn(DIM, FFN, device="meta")),
    _bad("b2", b2=torch.randn(DIM, dtype=torch.float16)),
    _bad("b2", b2=torch.randn(1, DIM)),
    _bad("chunk_size", chunk_size=0),
    _bad("chunk_size", chunk_size=2.5),
    _bad("chunk_size", chunk_size=True),
])
def test_op_bad_input_names_the_argument(name, change):
    w1, b1, w2, b2 = weights()
    args = dict(x=torch.randn(4, DIM), w1=w1, b1=b1, w2=w2, b2=b2, chunk_size=None) | change
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        vkern.ops.feed_forward(**args)


# --- the drop-in module ----------------------------------------------------------------------------

def test_module_shares_the_parameters_and_state_dict():
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate")
    mod = ChunkedFeedForward.from_diffusers(ff, chunk_size=16)
    assert [id(p) for p in mod.parameters()] == [id(p) for p in ff.parameters()]
    assert list(mod.state_dict()) == list(ff.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunking", [{}, {"chunk_size": 40}, {"budget_bytes": 40 * FFN * 4}])
def test_module_in_a_wan_block_gives_the_same_block_output(one_thread, dtype, chunking):
    block = WanTransformerBlock(DIM, FFN, num_heads=2, cross_attn_norm=True).to(dtype).eval()
    x = torch.randn(2, 113, DIM, dtype=dtype)  # 226 token rows: chunks of 40 leave 26
    context = torch.randn(2, 7, DIM, dtype=dtype)
    temb = torch.randn(2, 6, DIM, dtype=dtype)
    probe_before, probe_after = MaxIntermediate(FFN), MaxIntermediate(FFN)
    with torch.no_grad():
        with probe_before:
            want = block(x, context, temb, None)
        block.ffn = ChunkedFeedForward.from_diffusers(block.ffn, **chunking)
        with probe_after:
            got = block(x, context, temb, None)
    assert torch.equal(got, want)
    # Rows per chunk: all 226, 40, or what the budget allows (40 fp32 rows; 80 bf16 rows, rounded to 64).
    rows = chunking.get("chunk_size") or {torch.float32: 40, torch.bfloat16: 64}[dtype] if chunking else 226
    assert (probe_before.numel, probe_after.numel) == (226 * FFN, rows * FFN)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_module_budget_under_torch_compile_fullgraph(backend):
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate").eval()
    mod = ChunkedFeedForward.from_diffusers(ff, budget_bytes=64 * FFN * 4)
    compiled = torch.compile(mod, fullgraph=True, dynamic=True, backend=backend)  # chunk size from a symbolic length
    with torch.no_grad():
        for tokens in (300, 517):
            x = torch.randn(1, tokens, DIM)
            if backend == "aot_eager":  # the same aten ops: the same bits
                assert torch.equal(compiled(x), mod(x))
            else:  # inductor generates its own GELU (as it would for diffusers' FeedForward): fp32 rounding
                assert_within_torch_error(compiled(x), ref.feed_forward(x.double(), *(p.double() for p in ff_weights(ff))),
                                          mod(x), what=f"{tokens} tokens")


@pytest.mark.parametrize("activation", ["gelu", "geglu", "swiglu", "linear-silu"])
def test_module_rejects_other_activations(activation):
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn=activation)
    with pytest.raises(ValueError, match="gelu-approximate"):
        ChunkedFeedForward.from_diffusers(ff)


def test_module_rejects_what_it_would_bypass():
    with pytest.raises(TypeError, match="^ff:"):
        ChunkedFeedForward.from_diffusers(torch.nn.Linear(DIM, DIM))
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate")
    with pytest.raises(ValueError, match="chunk_size, budget_bytes"):
        ChunkedFeedForward.from_diffusers(ff, chunk_size=8, budget_bytes=10**6)
    with pytest.raises(ValueError, match="^chunk_size:"):
        ChunkedFeedForward.from_diffusers(ff, chunk_size=0)
    for name, m in (("", ff), (r"\.net\[0\]", ff.net[0])):  # what it replaces: their hooks would not run
        handle = m.register_forward_hook(lambda *a: None)
        with pytest.raises(ValueError, match=rf"^ff{name}: has forward hooks"):
            ChunkedFeedForward.from_diffusers(ff)
        handle.remove()


def test_module_calls_the_linears_as_modules_with_their_hooks():
    """The Linears are called per chunk as modules: hooks on them run, and subclasses (LoRA) keep their forward."""
    class LoraLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate").eval()
    ff.net[2] = LoraLinear(FFN, DIM)
    rows_seen = []
    ff.net[0].proj.register_forward_hook(lambda m, args, out: rows_seen.append(out.shape[0]))
    mod = ChunkedFeedForward.from_diffusers(ff, chunk_size=50)
    x = torch.randn(2, 60, DIM)
    with torch.no_grad():
        got = mod(x)
        rows_seen_chunked, rows_seen[:] = list(rows_seen), []
        want = ff(x)
    assert rows_seen_chunked == [50, 50, 20]
    assert_within_torch_error(got, ref.feed_forward(x.double(), *(p.double() for p in ff_weights(ff))) + 1.0, want)


@pytest.mark.parametrize("mode", ["storage", "compute"])
def test_module_with_fp8_linears(mode):
    """Fp8Linear layers inside (PatchConfig(fp8=..., fused_block=False, ffn_chunk_size=...)): chunked equals
    unchunked diffusers FeedForward on the same layers; in compute mode the GELU is fused with the down
    projection's quantization (ops.block_glue.gelu_tanh_fp8), equal up to the last ulp of tanh."""
    from vkern.modules.fp8_linear import Fp8Linear

    dim, ffn = 64, 192  # fp8 compute needs multiples of 16
    ff = FeedForward(dim, inner_dim=ffn, activation_fn="gelu-approximate").to(torch.bfloat16).eval()
    ff.net[0].proj = Fp8Linear.from_linear(ff.net[0].proj, mode)
    ff.net[2] = Fp8Linear.from_linear(ff.net[2], mode)
    mod = ChunkedFeedForward.from_diffusers(ff, chunk_size=70)
    x = torch.randn(3, 61, dim, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = mod(x), ff(x)
    if mode == "storage":
        assert torch.equal(got, want)
    else:
        assert (got != want).double().mean().item() < 0.02  # rows where one tanh ulp moved a code or a scale
        assert rel_l2(got, want) < 1e-2


def test_module_dropout_only_in_eval():
    ff = FeedForward(DIM, inner_dim=FFN, activation_fn="gelu-approximate", dropout=0.1, final_dropout=True)
    mod = ChunkedFeedForward.from_diffusers(ff, chunk_size=50)
    x = torch.randn(2, 113, DIM)
    with pytest.raises(RuntimeError, match="dropout"):
        mod.train()(x)
    with torch.no_grad():
        ff.eval()
        assert_within_torch_error(mod.eval()(x), ref.feed_forward(x.double(), *(p.double() for p in ff_weights(ff))),
                                  ff(x))
