"""bench/fp8_step_error.py on the CPU with the tiny Wan: fp8 compute adds error over vkern's floor, and a skip regex
that covers every default target gives the floor back exactly (the filter composes with diffusers' skip list)."""
from bench import fp8_step_error


def test_skipping_every_target_gives_the_floor_back():
    rows = dict(fp8_step_error.errors("wan-tiny", [r"^blocks\."], device="cpu"))
    assert list(rows) == ["no fp8", "all", r"^blocks\."]
    assert rows["all"] > rows["no fp8"] + 1e-3  # e4m3 weights and activations: ~1e-2 on the tiny Wan
    assert rows[r"^blocks\."] == rows["no fp8"]  # Wan's only default targets are in its blocks


def test_shape_names():
    assert fp8_step_error.step_spec("wan-animate-tiny") == ("wan-animate", "tiny", "tiny")
    assert fp8_step_error.step_spec("wan14b-720p") == ("wan", "14b", "720p")
