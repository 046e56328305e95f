"""vkern's custom ops skip the dispatcher on plain eager calls only (vkern/ops/_custom_op.py): same results, and
every call that needs the registered op (tracing, dispatch modes, fake tensors, autograd) still gets it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vkern import ops
from vkern.ops import _custom_op, block_glue


class SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    return torch.randn(2, 5, 16), torch.randn(2, 5, 16), torch.randn(2, 1, 16)


@pytest.fixture
def dispatcher_calls(monkeypatch):
    """Counts the calls that went through torch.ops.vkern.gate_residual(_inplace)."""
    calls = []
    for op in (block_glue._gate_residual, block_glue._gate_residual_inplace):
        real = op._op
        monkeypatch.setattr(op, "_op", lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def test_plain_eager_call_skips_the_dispatcher_with_the_same_result(inputs, dispatcher_calls):
    x, y, gate = inputs
    fast = ops.gate_residual(x, y, gate)
    assert dispatcher_calls == []
    assert torch.equal(fast, torch.ops.vkern.gate_residual(x, y, gate, None, False, None))


def test_dispatch_mode_sees_the_op(inputs):
    x, y, gate = inputs
    with SeenOps() as seen:
        ops.gate_residual(x, y, gate)
    assert seen.names == ["vkern.gate_residual.default"]


def test_recorded_autograd_goes_through_the_op(inputs, dispatcher_calls):
    x, y, gate = inputs
    ops.gate_residual(x.requires_grad_(True), y, gate)
    assert dispatcher_calls == [1]
    with torch.no_grad():  # nothing to record: the fast path
        ops.gate_residual(x, y, gate)
    assert dispatcher_calls == [1]


def test_fake_tensors_go_through_the_op(inputs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x, y, gate = (mode.from_tensor(t) for t in inputs)
        out = ops.gate_residual(x, y, gate)
    assert out.shape == x.shape and type(out).__name__ == "FakeTensor"


def test_torch_function_mode_sees_the_op(inputs):
    from torch.overrides import TorchFunctionMode

    class Seen(TorchFunctionMode):
        names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, y, gate = inputs
    with Seen():
        ops.gate_residual(x, y, gate)
    assert "vkern.gate_residual" in Seen.names


def test_profiler_sees_the_op(inputs):
    x, y, gate = inputs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.gate_residual(x, y, gate)
    assert "vkern::gate_residual" in {e.key for e in prof.events()}


class Traced(torch.Tensor):
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(str(func))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclass_sees_the_op(inputs):
    x, y, gate = inputs
    Traced.seen.clear()
    out = ops.gate_residual(x.as_subclass(Traced), y, gate)
    assert "vkern.gate_residual" in Traced.seen and type(out) is Traced


def test_compile_traces_the_op(inputs):
    x, y, gate = inputs
    compiled = torch.compile(lambda a: ops.gate_residual(a, y, gate), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ops.gate_residual(x, y, gate))


def test_in_place_fast_path_bumps_the_version_like_the_dispatcher(inputs, dispatcher_calls):
    x, y, gate = inputs
    expected = ops.gate_residual(x, y, gate)
    before = x._version
    ops.gate_residual_(x, y, gate)
    assert dispatcher_calls == [] and x._version > before and torch.equal(x, expected)
    with torch.inference_mode():  # inference tensors have no version counter
        z = x.clone()
        ops.gate_residual_(z, y, gate)
    assert torch.equal(z, ops.gate_residual(expected, y, gate))


def test_every_vkern_custom_op_is_an_eager_fast_op():
    import importlib

    modules = [importlib.import_module(f"vkern.ops.{m}")  # (vkern.ops.feed_forward is also a function's name)
               for m in ("block_glue", "causal_conv", "feed_forward", "fp8", "fused_attention")]
    names = [n for n in dir(torch.ops.vkern) if not n.startswith("_") and hasattr(getattr(torch.ops.vkern, n),
                                                                                     "default")]
    assert len(names) >= 20
    wrapped = {obj._op._qualified_op_name.split("::")[1] for m in modules for obj in vars(m).values()
               if isinstance(obj, _custom_op.EagerFastOp)}
    assert set(names) <= wrapped
