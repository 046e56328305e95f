"""Plain-PyTorch oracles, CPU-runnable, written to match diffusers numerics. Every kernel is tested
against these."""
