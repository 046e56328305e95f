"""Sequence parallelism (Ulysses) for diffusers' WanTransformer3DModel, WanVACETransformer3DModel,
WanAnimateTransformer3DModel and ChronoEditTransformer3DModel (Wan's forward, its own RoPE table), installed by
vkern.patch(model, PatchConfig(sp=SPConfig())) under torchrun.

Every rank holds the whole model and the same inputs. Hooks shard the work:
  model pre-hook     make the ranks agree on this step's inputs (SPConfig.check_inputs: by default
                     once per input shape signature, so steady-state steps cost nothing), fix the
                     layout (ShardSpec) of the step, and shard a per-token timestep (Wan 2.2 TI2V)
  rope hook          the RoPE tables [1, S, 1, D] -> this rank's S/N positions (zero-padded)
  blocks[0] pre-hook the patch-embedded tokens [B, S, C] -> this rank's S/N tokens (zero-padded)
  attn1 processors   VkernWanSPAttnProcessor: one packed q/k/v all-to-all + one output all-to-all
                     (SPConfig.zero_copy: q/k written into the send buffer by the QK prologue)
                     (SPConfig.overlap_chunks > 1: per head group, overlapped with attention;
                     SPConfig.ring_degree > 1: Ulysses inside groups of world / ring_degree ranks,
                     ring attention across them)
  proj_out hook      all_gather of the projected tokens, padding dropped -> [B, S, C_out]
  face adapters      (Wan Animate) VkernWanAnimateFaceSPProcessor: each token attends to its own frame's motion
                     tokens, so a rank runs diffusers' processor per frame its slice touches (no exchange)
  VACE block hooks   (Wan VACE) the embedded input and the control states a VACE block reads -> this rank's
                     tokens, where they arrive whole (diffusers' forward runs the VACE blocks before the main ones,
                     vkern's interleaves them), so the hints come out sharded like the main tokens; the VACE
                     blocks' self-attention is sharded as the main blocks'
The text (encoder_hidden_states) stays replicated, so cross-attention runs locally; so do Animate's motion and face
encoders (their inputs are checked like the others).

The gather sits after proj_out rather than before norm_out: proj_out maps inner_dim (5120 for
Wan-14B) to out_channels * patch (64) values per token, so the gather moves 80x fewer bytes, and
norm_out/proj_out work on S/N tokens per rank instead of S on every rank. Per-token shift/scale
(TI2V) stay consistent because the timestep is sharded the same way.

Inference only: the all-to-alls carry no autograd; a forward that would need gradients is refused.
"""
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ..modules._grad import records_autograd
from ..reference.sequence_parallel import ShardSpec, shard_sequence
from . import timing, ulysses

__all__ = ["SPConfig", "apply_sequence_parallel"]


CHECK_MODES = ("per-shape", "every-step", "off")
QKV_EXCHANGES = ("kv-first", "v-first", "one")


@dataclass
class SPConfig:
    """group           None (the default process group), a ProcessGroup, or an SPGroup (init_from_env)
    check_inputs    how often the ranks make sure they run the same step on the same inputs (shapes,
                    dtypes and checksums of the latents, timestep and text), with one all_gather, so a
                    mismatch is the same clear error on every rank instead of a hang or a mixed video:
                    "per-shape" (default): the first forward of each input shape signature (a new
                    resolution, batch or frame count; an unseeded generator differs at the first
                    step); later steps of a known signature cost nothing. "every-step": every forward
                    (one host sync and a few ms per step). "off" (or False): never. True means
                    "every-step". A rank that meets a new shape while the others repeat a known one
                    cannot be told apart from a slow rank: the group's timeout ends it.
    fp8_payload     send q/k/v as e4m3 with one fp32 scale per token and head (D + 4 bytes instead
                    of 2 D per token and head for bf16); lossy, off by default
    overlap_chunks  split each self-attention's exchanges into this many head groups, so attention
                    of one group overlaps the all-to-alls of the others (1: one q/k/v and one output
                    all-to-all per layer)
    ring_degree     1: pure Ulysses (heads padded up to a multiple of the world size). R > 1: world / R
                    ranks per Ulysses group, R groups in a ring passing key/value blocks (for more
                    ranks than heads; world must be a multiple of R; with 1 < R < world the SP group
                    must span the whole default process group, since sub-groups are created)
    timeout         a datetime.timedelta for the sub-groups ring_degree creates (None: torch's
                    default for new groups)
    zero_copy       True (default): with one exchange per layer and the native payload, the fused QK
                    prologue writes q/k straight into the all-to-all send buffer (no pack copy of q/k);
                    False: pack by copying, as before (the same bits; for A/B measurement). The other
                    configurations always pack by copying. Received q/k/v are views at B = 1 either way.
                    The zero-copy path also writes to_v's GEMM into the send buffer and splits to_out
                    by heads over the output's receive buffer (vkern/modules/wan_sp_attention.py).
    qkv_exchange    zero-copy path only: how q/k/v travel. "kv-first" (default): k and v in one
                    all-to-all started as soon as they are written, overlapping q's projection and
                    prologue, then q's; "v-first": v alone first, then q and k; "one": one packed
                    q/k/v all-to-all after all three projections."""
    group: Any = None
    check_inputs: Any = "per-shape"
    fp8_payload: bool = False
    overlap_chunks: int = 1
    ring_degree: int = 1
    timeout: Any = None
    zero_copy: bool = True
    qkv_exchange: str = "kv-first"

    def __post_init__(self):
        pg = getattr(self.group, "group", self.group)
        if pg is not None and not isinstance(pg, dist.ProcessGroup):
            raise TypeError(f"SPConfig.group: expected None, a torch.distributed ProcessGroup or an SPGroup, "
                            f"got {type(self.group).__name__}")
        if isinstance(self.check_inputs, bool):
            self.check_inputs = "every-step" if self.check_inputs else "off"
        elif not isinstance(self.check_inputs, str):
            raise TypeError(f"SPConfig.check_inputs: expected a bool or one of {CHECK_MODES}, "
                            f"got {self.check_inputs!r}")
        if self.check_inputs not in CHECK_MODES:
            raise ValueError(f"SPConfig.check_inputs: expected one of {CHECK_MODES}, got {self.check_inputs!r}")
        if self.qkv_exchange not in QKV_EXCHANGES:
            raise ValueError(f"SPConfig.qkv_exchange: expected one of {QKV_EXCHANGES}, got {self.qkv_exchange!r}")
        for name in ("fp8_payload", "zero_copy"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SPConfig.{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("overlap_chunks", "ring_degree"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SPConfig.{name}: expected a positive int, got {value!r}")
        if self.ring_degree > 1 and self.overlap_chunks > 1:
            raise ValueError("SPConfig: overlap_chunks > 1 needs ring_degree=1 (the ring overlaps its own "
                             "transfers with attention)")


@dataclass(frozen=True)
class SPLayout:
    """One forward's layout. spec: the tokens over the whole SP group (sharding, RoPE, gather).
    attn_spec: the Ulysses exchange inside this rank's Ulysses group (spec itself without a ring).
    real_keys: per ring rank, how many keys of its sequence block are real (ring only)."""
    spec: ShardSpec
    attn_spec: ShardSpec
    real_keys: tuple


class SPContext:
    """What the hooks and processors of one patched model share."""

    def __init__(self, group, world, rank, heads, config=None, ulysses_group=None, ring_group=None):
        self.group, self.world, self.rank, self.heads = group, world, rank, heads
        self.config = config if config is not None else SPConfig()
        self.ring_degree = self.config.ring_degree
        self.ulysses_degree = world // self.ring_degree
        # Sub-groups: the Ulysses exchange (None: nothing to exchange) and the ring (None: no ring).
        self.ulysses_group = group if ulysses_group is None and self.ring_degree == 1 else ulysses_group
        self.ring_group = ring_group
        self.layout = None  # set by the model's pre-hook, cleared when its forward ends
        self.agreed = set()  # input signatures every rank has checked together (check_inputs="per-shape")

    def current(self):
        if self.layout is None:
            raise RuntimeError("vkern sequence parallelism: a sharded attention ran outside the patched "
                               "WanTransformer3DModel's forward; call the model, not its blocks")
        return self.layout

    def make_layout(self, seq_len):
        spec = ShardSpec.create(seq_len, self.heads, self.world)
        if self.ring_degree == 1:
            return SPLayout(spec, spec, ())
        u, block = self.ulysses_degree, self.ulysses_degree * spec.local_seq_len
        real = tuple(min(max(seq_len - g * block, 0), block) for g in range(self.ring_degree))
        return SPLayout(spec, ShardSpec.create(block, self.heads, u), real)


def _sub_groups(pg, world, rank, config):
    """(ulysses_group, ring_group) for config.ring_degree R: rank g * U + i (U = world / R) is member
    i of Ulysses group g (sequence block g) and member g of ring group i. Collective."""
    R = config.ring_degree
    U = world // R
    if R == 1:
        return pg, None
    if U == 1:
        return None, pg
    ranks = [dist.get_global_rank(pg, r) for r in range(world)]
    kwargs = {} if config.timeout is None else {"timeout": config.timeout}
    mine = {}
    # Every process of the default group creates every sub-group, in the same order.
    for g in range(R):
        group = dist.new_group([ranks[g * U + i] for i in range(U)], **kwargs)
        if rank // U == g:
            mine["ulysses"] = group
    for i in range(U):
        group = dist.new_group([ranks[g * U + i] for g in range(R)], **kwargs)
        if rank % U == i:
            mine["ring"] = group
    return mine["ulysses"], mine["ring"]


def apply_sequence_parallel(model, sp_config, handle):
    """Install sequence parallelism on a WanTransformer3DModel, WanVACETransformer3DModel,
    WanAnimateTransformer3DModel or ChronoEditTransformer3DModel, recording every change in handle (a vkern
    PatchHandle; handle.config is the PatchConfig) so undo() removes it. Collective: every rank of the group must call it, and all of them raise if any
    rank's model or config differs."""
    from ..modules.wan_animate_sp import VkernWanAnimateFaceSPProcessor
    from ..modules.wan_sp_attention import VkernWanSPAttnProcessor

    pg, world, rank = ulysses._group(sp_config.group)
    config = handle.config
    error = ulysses._local_error(lambda: _check_model(model, sp_config, pg, world))
    signature = {} if error else _patch_signature(model, config, sp_config, world)
    _agree(pg, "vkern.patch(sp=...)", signature, error,
           "every rank must patch the same model (same weights) with the same PatchConfig and SPConfig")

    ulysses_group, ring_group = _sub_groups(pg, world, rank, sp_config)
    context = SPContext(pg, world, rank, model.config.num_attention_heads, sp_config, ulysses_group, ring_group)
    extra = _EXTRA_INPUTS.get(type(model).__name__, {})
    hooks = [
        model.register_forward_pre_hook(partial(_enter, context, sp_config.check_inputs, extra), with_kwargs=True),
        # always_call: a forward that raised must not leave a stale layout behind.
        model.register_forward_hook(partial(_leave, context), always_call=True),
        model.rope.register_forward_hook(partial(_shard_rope, context)),
        model.blocks[0].register_forward_pre_hook(partial(_shard_tokens, context), with_kwargs=True),
        model.proj_out.register_forward_hook(partial(_gather_tokens, context)),
        *(block.register_forward_pre_hook(partial(_shard_vace_inputs, context), with_kwargs=True)
          for block in getattr(model, "vace_blocks", ())),
    ]
    for hook in hooks:
        handle._undo.append(hook.remove)
    handle.summary["sequence-parallel hooks"] += len(hooks)
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    blocks += [(f"vace_blocks.{i}", b) for i, b in enumerate(getattr(model, "vace_blocks", ()))]
    for name, block in blocks:
        # Every self-attention must be sharded for the model to be correct, so filter_fn cannot
        # leave one alone; one it rejects gets diffusers' own math (the reference ops) instead.
        accepted = config.accepts(block.attn1, f"{name}.attn1")
        processor = VkernWanSPAttnProcessor(context, config.attention if accepted else "reference",
                                            config.fused_qk_norm_rope and accepted)
        handle.set_processor(block.attn1, processor, "WanAttention self-attention -> sequence-parallel")
    for adapter in getattr(model, "face_adapter", ()):  # Wan Animate
        handle.set_processor(adapter, VkernWanAnimateFaceSPProcessor(context, adapter.processor),
                             "face adapter -> per-frame slices of this rank's tokens")


# ---------------------------------------------------------------- checks

def _check_model(model, sp_config, pg, world):
    # (diffusers' enable_parallelism() on the model: refused by the adapter before this, patch/handle.py)
    if len(model.blocks) == 0:
        raise ValueError("model: WanTransformer3DModel with no blocks")
    R = sp_config.ring_degree
    if world % R:
        raise ValueError(f"SPConfig.ring_degree: expected a divisor of the world size {world}, got {R}")
    if 1 < R < world and world != dist.get_world_size():
        raise ValueError(f"SPConfig.ring_degree={R} with {world // R} ranks per Ulysses group creates sub-groups, "
                         f"so the SP group must span the whole default group ({dist.get_world_size()} ranks), "
                         f"not {world}")


def _patch_signature(model, config, sp_config, world):
    sig = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items()
           if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
    sig.update({"world": world, "device type": model.proj_out.weight.device.type,
                "parameter dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                "PatchConfig.attention": config.attention,
                "PatchConfig.fused_qk_norm_rope": config.fused_qk_norm_rope,
                "PatchConfig.ffn_chunk_size": config.ffn_chunk_size, "PatchConfig.fp8": config.fp8,
                "SPConfig.check_inputs": sp_config.check_inputs, "SPConfig.fp8_payload": sp_config.fp8_payload,
                "SPConfig.overlap_chunks": sp_config.overlap_chunks, "SPConfig.ring_degree": sp_config.ring_degree,
                "SPConfig.zero_copy": sp_config.zero_copy,
                "SPConfig.qkv_exchange": sp_config.qkv_exchange,
                # Random-weight models built without the same seed (or different checkpoints) would
                # otherwise give a plausible-looking wrong video. State dict: fp8 weights are buffers.
                "weights checksum": _checksum(*(t for t in model.state_dict().values() if t.is_floating_point()))})
    return sig


# The forward's other inputs every rank must hold alike, by model class: {name: positional index}.
_EXTRA_INPUTS = {"WanAnimateTransformer3DModel": {"pose_hidden_states": 4, "face_pixel_values": 5},
                 "WanVACETransformer3DModel": {"control_hidden_states": 4, "control_hidden_states_scale": 5}}


def _input_signature(hidden_states, timestep, text, image, grad, extra):
    sig = {"hidden_states shape": list(hidden_states.shape), "hidden_states dtype": str(hidden_states.dtype),
           "timestep shape": list(timestep.shape), "encoder_hidden_states shape": list(text.shape),
           "encoder_hidden_states_image shape": None if image is None else list(image.shape),
           "gradients": grad,
           # Different latents or prompts per rank (an unseeded generator) would mix two videos.
           "hidden_states checksum": _checksum(hidden_states), "timestep checksum": _checksum(timestep),
           "encoder_hidden_states checksum": _checksum(text)}
    if image is not None:
        sig["encoder_hidden_states_image checksum"] = _checksum(image)
    for name, t in extra.items():
        sig[f"{name} shape"] = None if t is None else list(t.shape)
        if t is not None:
            sig[f"{name} checksum"] = _checksum(t)
    return sig


def _checksum(*tensors):
    """(sum, sum of |x|) in float64: equal data on equal hardware gives equal sums."""
    total = [0.0, 0.0]
    for t in tensors:
        if t.device.type == "meta":
            continue
        t = t.detach().to(torch.float64)
        total[0] += t.sum().item()
        total[1] += t.abs().sum().item()
    return total


def _same(a, b):
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _agree(pg, what, signature, error, hint):
    """Every rank raises the same ValueError when any rank failed its local checks (error) or the
    ranks' signatures ({name: value}) differ; a rank that failed raises its own error. One
    all_gather_object, so no rank is left waiting in a collective the others skipped."""
    mine = {"error": None if error is None else f"{type(error).__name__}: {error}", "signature": signature}
    rows = [None] * dist.get_world_size(pg)
    dist.all_gather_object(rows, mine, group=pg)
    if error is not None:
        raise error
    failed = {r: row["error"] for r, row in enumerate(rows) if row["error"] is not None}
    if failed:
        raise ValueError(f"{what}: rank(s) {sorted(failed)} failed ({'; '.join(failed.values())}); nothing was "
                         f"exchanged")
    for name in signature:
        values = [row["signature"].get(name) for row in rows]
        if not all(_same(values[0], v) for v in values[1:]):
            shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
            raise ValueError(f"{what}: the ranks disagree on {name} ({shown}); {hint}")


# ---------------------------------------------------------------- hooks

def _arg(args, kwargs, index, name):
    return args[index] if len(args) > index else kwargs.get(name)


def _enter(context, check, extra_inputs, model, args, kwargs):
    hidden_states = _arg(args, kwargs, 0, "hidden_states")
    timestep = _arg(args, kwargs, 1, "timestep")
    text = _arg(args, kwargs, 2, "encoder_hidden_states")
    image = _arg(args, kwargs, 3, "encoder_hidden_states_image")
    extra = {name: _arg(args, kwargs, index, name) for name, index in extra_inputs.items()}
    p_t, p_h, p_w = model.config.patch_size
    error = None
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        error = ValueError(f"hidden_states: expected a [B, C, F, H, W] tensor, got "
                           f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}")
    elif not isinstance(timestep, torch.Tensor) or not isinstance(text, torch.Tensor):
        error = TypeError("timestep, encoder_hidden_states: expected tensors")
    else:
        _, _, F, H, W = hidden_states.shape
        seq_len = (F // p_t) * (H // p_h) * (W // p_w)
        grad = records_autograd(model)
        if grad:
            error = RuntimeError("vkern sequence parallelism is inference-only (the all-to-alls carry no "
                                 "gradients): run under torch.no_grad() or torch.inference_mode()")
        elif timestep.dim() == 2 and timestep.shape[1] != seq_len:
            error = ValueError(f"timestep: a per-token timestep must be [B, {seq_len}] (the patched tokens), "
                               f"got {tuple(timestep.shape)}")
    key = None
    if error is None:
        key = tuple((tuple(t.shape), str(t.dtype), t.device.type) if isinstance(t, torch.Tensor) else None
                    for t in (hidden_states, timestep, text, image, *extra.values())) + (grad,)
    # A local error is raised through the agreement when checks run, so the other ranks hear of it.
    if check == "every-step" or (check == "per-shape" and (error is not None or key not in context.agreed)):
        signature = {} if error else _input_signature(hidden_states, timestep, text, image, grad, extra)
        _agree(context.group, f"{type(model).__name__} forward (sequence parallel)", signature, error,
               "every rank must run the same step on the same inputs (seed the latents and noise alike)")
        context.agreed.add(key)
    elif error is not None:
        raise error
    context.layout = context.make_layout(seq_len)
    if timestep.dim() == 2:  # Wan 2.2 TI2V: one timestep per token, sharded like the tokens
        timestep = shard_sequence(timestep, context.world, context.rank).contiguous()
        if len(args) > 1:
            args = (*args[:1], timestep, *args[2:])
        else:
            kwargs = {**kwargs, "timestep": timestep}
        return args, kwargs
    return None


def _leave(context, model, args, output):
    context.layout = None


def _shard_rope(context, rope, args, output):
    if context.layout is None:
        return None
    return tuple(shard_sequence(f, context.world, context.rank).contiguous() for f in output)


def _shard_tokens(context, block, args, kwargs):
    if context.layout is None:
        return None
    if args:
        return (shard_sequence(args[0], context.world, context.rank).contiguous(), *args[1:]), kwargs
    hidden = shard_sequence(kwargs["hidden_states"], context.world, context.rank).contiguous()
    return args, {**kwargs, "hidden_states": hidden}


def _shard_vace_inputs(context, block, args, kwargs):
    """A VACE block's hidden_states (the embedded input) and control_hidden_states -> this rank's tokens where they
    are whole (S tokens); ones already sharded pass. (Sharding is idempotent where ceil(S / world) = S, i.e. S = 1.)"""
    layout = context.layout
    if layout is None:
        return None
    args, kwargs = list(args), dict(kwargs)
    for index, name in ((0, "hidden_states"), (2, "control_hidden_states")):
        holder, key = (args, index) if len(args) > index else (kwargs, name)
        x = holder[key]
        if x.shape[1] == layout.spec.seq_len:
            holder[key] = shard_sequence(x, context.world, context.rank).contiguous()
    return tuple(args), kwargs


def _gather_tokens(context, proj_out, args, output):
    """[B, S_local, C] on each rank -> [B, S, C] on every rank (rank order is sequence order)."""
    layout = context.layout
    if layout is None:
        return None
    local = output.contiguous()
    B, S_local, C = local.shape
    # Concatenated along dim 0 (the form gloo accepts too); as bytes, like the all-to-alls, since
    # gloo lacks some dtypes. (all_gather_into_tensor is the name before torch 2.13.)
    gathered = local.new_empty((context.world * B, S_local, C))
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    token = timing.begin(local.device)
    all_gather(gathered.view(torch.uint8), local.view(torch.uint8), group=context.group)
    timing.end(token, "all_gather")
    full = gathered.unflatten(0, (context.world, B)).transpose(0, 1).reshape(B, layout.spec.padded_seq_len, C)
    return full[:, :layout.spec.seq_len]
