"""PatchHandle: records every change vkern.patch makes so undo() restores the originals exactly."""
from collections import Counter

_MARK = "_vkern_patch_handle"


class PatchHandle:
    def __init__(self, target, config):
        self.target = target
        self.config = config
        self.summary = Counter()  # what was swapped, e.g. {"WanAttention processor": 60}
        self._undo = []  # callables, run in reverse order
        self.children = []  # handles of a pipeline's components
        self.active = True

    def mark(self, obj):
        if getattr(obj, _MARK, None) is not None:
            raise RuntimeError(f"vkern.patch: {type(obj).__name__} is already patched by vkern; "
                               "call handle.undo() on the earlier patch first")
        object.__setattr__(obj, _MARK, self)
        self._undo.append(lambda: object.__delattr__(obj, _MARK))

    def set_processor(self, attn, processor, kind):
        original = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(original))
        self.summary[kind] += 1

    def override_forward(self, module, forward, kind):
        """Give one module instance another forward (its class, hooks and parameters stay)."""
        previous = module.__dict__.get("forward")
        module.forward = forward

        def restore():
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._undo.append(restore)
        self.summary[kind] += 1

    def swap_module(self, parent, name, replacement, kind, park=None):
        """park: called on undo before the original goes back (e.g. to bring its weights back from
        the CPU, where an fp8 patch parked them)."""
        original = getattr(parent, name)
        setattr(parent, name, replacement)

        def restore():
            if park is not None:
                park()
            setattr(parent, name, original)
        self._undo.append(restore)
        self.summary[kind] += 1

    def undo(self):
        """Restore every original module and processor (the same objects, so outputs are bit-identical)."""
        if not self.active:
            raise RuntimeError("vkern: this patch was already undone")
        for child in reversed(self.children):
            child.undo()
        for step in reversed(self._undo):
            step()
        self._undo.clear()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.active:
            self.undo()

    def __repr__(self):
        parts = dict(self.summary)
        for child in self.children:
            parts.update({f"{type(child.target).__name__}: {k}": v for k, v in child.summary.items()})
        state = "active" if self.active else "undone"
        return f"PatchHandle({type(self.target).__name__}, {state}, {parts})"


def patched_handle(obj):
    """The active handle that patched obj, or None."""
    return getattr(obj, _MARK, None)
