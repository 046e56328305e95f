class PatchConfig:  # placeholder until the patch module lands (same session)
    pass


def patch(obj, config=None):
    raise NotImplementedError
