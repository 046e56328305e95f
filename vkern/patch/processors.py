"""The body of the adapters that swap attention processors only (the families beyond Wan): the checks, fp8 layerwise
casting, then each of diffusers' processors of the given classes replaced by vkern's."""
from .fp8 import quantize_linears
from .handle import refuse_context_parallel, refuse_wan_only


def patch_processors(model, config, handle, originals, make, kind):
    """originals: diffusers' processor classes to replace; make(attention mode, original processor) -> vkern's;
    kind: the handle's summary key."""
    refuse_wan_only(model, config)
    refuse_context_parallel(model)
    if config.fp8 is not None:
        quantize_linears(model, config, handle)
    for fqn, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, originals) and config.accepts(module, fqn):
            handle.set_processor(module, make(config.attention, processor), kind)
