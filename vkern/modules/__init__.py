"""Drop-in modules and processors built on vkern.ops."""
