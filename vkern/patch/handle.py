"""PatchHandle: records every change vkern.patch makes so undo() restores the originals exactly."""
import warnings
from collections import Counter

_MARK = "_vkern_patch_handle"


class PatchHandle:
    def __init__(self, target, config):
        self.target = target
        self.config = config
        self.summary = Counter()  # what was swapped, e.g. {"WanAttention processor": 60}
        self._undo = []  # callables, run in reverse order
        self._undo_checks = []  # callables -> None or why undo() cannot run: all asked before anything changes
        self._swaps = []  # (parent, name, the module swapped in, its name): checked in place before undo()
        self.children = []  # handles of a pipeline's components
        self.active = True
        self._backend_noted = False

    def mark(self, obj):
        if getattr(obj, _MARK, None) is not None:
            raise RuntimeError(f"vkern.patch: {type(obj).__name__} is already patched by vkern; "
                               "call handle.undo() on the earlier patch first")
        object.__setattr__(obj, _MARK, self)
        self._undo.append(lambda: object.__delattr__(obj, _MARK))

    def set_processor(self, attn, processor, kind):
        original = attn.processor
        backend = getattr(original, "_attention_backend", None)
        if backend is not None and not self._backend_noted:  # (model.set_attention_backend() before the patch)
            self._backend_noted = True
            warnings.warn(f"vkern.patch: {type(self.target).__name__}'s attention processors had diffusers' attention "
                          f"backend {getattr(backend, 'value', backend)!r}; vkern's processors choose their own "
                          f"(PatchConfig.attention={self.config.attention!r}); undo() restores diffusers' choice",
                          stacklevel=4)
        assign_processor(attn, processor)
        self._undo.append(lambda: assign_processor(attn, original))
        self.summary[kind] += 1

    def override_forward(self, module, forward, kind):
        """Give one module instance another forward (its class, hooks and parameters stay)."""
        refuse_wrapped(module, "give it another forward")
        previous = module.__dict__.get("forward")
        module.forward = forward
        self._undo_checks.append(lambda: None if module.__dict__.get("forward") is forward else (
            f"{type(module).__name__}'s forward was wrapped after vkern patched it (e.g. enable_cache or offloading "
            "hooks); remove those first"))

        def restore():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._undo.append(restore)
        self.summary[kind] += 1

    def swap_module(self, parent, name, replacement, kind, park=None, fqn=None):
        """park: called on undo before the original goes back (e.g. to bring its weights back from
        the CPU, where an fp8 patch parked them). fqn: the swapped module's name, for messages."""
        original = getattr(parent, name)
        refuse_wrapped(original, "replace it")
        setattr(parent, name, replacement)
        self._swaps.append((parent, name, replacement, fqn or f"{type(parent).__name__}.{name}"))
        if len(self._swaps) == 1:
            self._undo_checks.append(self._swaps_in_place)

        def restore():
            if park is not None:
                park()
            setattr(parent, name, original)
        self._undo.append(restore)
        self.summary[kind] += 1

    def _swaps_in_place(self):
        """None, or why undo() cannot put the swapped modules back: some are no longer where vkern put them, inside
        this model (e.g. PEFT's unload_lora_weights() lifted an Fp8Linear out of its LoRA layer)."""
        reachable = {id(m) for m in self.target.modules()}
        moved = [where for parent, name, new, where in self._swaps
                 if id(parent) not in reachable or getattr(parent, name, None) is not new]
        if moved:
            return (f"{len(moved)} module(s) vkern swapped in were moved or replaced since (first: {moved[0]}; e.g. "
                    "by unloading LoRA adapters after patching); reload the model instead")
        return None

    def undo(self):
        """Restore every original module and processor (the same objects, so outputs are bit-identical)."""
        if not self.active:
            raise RuntimeError("vkern: this patch was already undone")
        blocked = [why for why in self._why_not_undoable() if why]
        if blocked:
            raise RuntimeError("vkern: undo() cannot restore the original model, so it changed nothing: "
                               + "; ".join(dict.fromkeys(blocked)))
        for child in reversed(self.children):
            if child.active:  # (a component's own handle may have been undone already)
                child.undo()
        for step in reversed(self._undo):
            step()
        self._undo.clear()
        self.active = False

    def forbid_undo(self, reason):
        """undo() will refuse (before changing anything) with this reason."""
        self._undo_checks.append(lambda: reason)

    def _why_not_undoable(self):
        for child in self.children:
            if child.active:
                yield from child._why_not_undoable()
        yield from (check() for check in self._undo_checks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self.undo()

    def __repr__(self):
        parts = dict(self.summary)
        for child in self.children:  # (two components of one class, e.g. Wan 2.2's transformers: summed)
            for k, v in child.summary.items():
                key = f"{type(child.target).__name__}: {k}"
                parts[key] = parts.get(key, 0) + v
        state = "active" if self.active else "undone"
        return f"PatchHandle({type(self.target).__name__}, {state}, {parts})"


def assign_processor(attn, processor):
    """attn.set_processor(processor), for attention modules that have no such method too."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)
    else:  # (diffusers' MochiAttention keeps its processor as a plain attribute)
        attn.processor = processor


def refuse_wrapped(module, action):
    """Hooks that replaced this instance's forward (diffusers' hook registry: caches, group offloading, layerwise
    casting; accelerate's: cpu offload) would be dropped or bypassed by vkern's change: an error that says so (the
    caller's patch() then undoes what it did), not a model that silently runs without them."""
    registry = getattr(module, "_diffusers_hook", None)
    hooks = [f"diffusers hook {name!r}" for name in getattr(registry, "hooks", {})]
    hooks += ["accelerate's _hf_hook"] if hasattr(module, "_hf_hook") else []
    forward = module.__dict__.get("forward")
    if not hooks and forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
        hooks = ["an instance forward"]  # (diffusers leaves the bound class method behind when its hooks go)
    if hooks:
        what = ", ".join(hooks)
        raise RuntimeError(
            f"vkern.patch: {type(module).__name__} carries hooks that wrap its forward ({what}: e.g. from "
            f"enable_cache, enable_layerwise_casting, group offloading or enable_model_cpu_offload); vkern would "
            f"{action} and bypass them. Patch first, then enable those (or remove them before patching).")


# PatchConfig fields that change Wan's blocks only; asked for on another model they would do nothing: errors.
WAN_ONLY = ("ffn_chunk_size", "attention_chunk_size", "sp")


def refuse_wan_only(model, config):
    asked = [name for name in WAN_ONLY if getattr(config, name) is not None]
    if asked:
        raise ValueError(f"vkern.patch: PatchConfig.{', '.join(asked)}: not available for {type(model).__name__} "
                         "(Wan transformers only); leave them None")


def refuse_context_parallel(model):
    """diffusers' enable_parallelism() shards the sequence and has its processors' attention exchange it across
    ranks; vkern's processors attend over what they are given, so patching would silently compute per-rank
    attention. vkern's own sequence parallelism is PatchConfig(sp=...) (Wan)."""
    if getattr(model, "_parallel_config", None) is not None:
        raise ValueError(f"vkern.patch: {type(model).__name__} has diffusers' enable_parallelism() applied; vkern's "
                         "processors would bypass its sequence exchange. Patch a model without it (for Wan, "
                         "vkern's own: PatchConfig(sp=vkern.SPConfig()))")


def patched_handle(obj):
    """The active handle that patched obj, or None."""
    return getattr(obj, _MARK, None)
