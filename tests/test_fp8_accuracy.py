"""bench/fp8_accuracy.py on the CPU with the tiny Wan: every layer the fp8 patch converts is measured exactly
once, the numbers clear the floors, and a broken quantizer is caught (low SQNR)."""
import json
import math

import pytest
import torch
from torch import nn

import vkern
from bench import fp8_accuracy
from vkern import models
from vkern.modules.fp8_linear import Fp8Linear


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The CLI once (tiny, CPU): its returned rows and what it appended to --out."""
    out = tmp_path_factory.mktemp("fp8acc") / "rows.jsonl"
    rows = fp8_accuracy.main(["--size", "tiny", "--device", "cpu", "--out", str(out)])
    return rows, [json.loads(line) for line in out.read_text().splitlines()]


def tiny_bf16():
    torch.manual_seed(0)
    model = models.build_wan_transformer("tiny", torch.bfloat16)
    return model, models.transformer_inputs(model, "tiny", torch.bfloat16, "cpu")


def fp8_rows(rows):
    return {r["provider"].removeprefix("vkern-fp8-"): r for r in rows if r["provider"].startswith("vkern-fp8-")}


def test_rows_written_with_run_metadata(run):
    rows, written = run
    assert written == rows
    assert [r["provider"] for r in rows] == ["vkern", "vkern-fp8-storage", "vkern-fp8-compute"]
    for r in rows:
        assert r["op"] == "fp8-accuracy" and r["shape"] == "wan-tiny" and r["world"] == 1
        assert r["gpu"] == "cpu" and r["torch"] == torch.__version__ and r["commit"] and r["date"]


def test_every_converted_layer_is_measured_exactly_once(run):
    model, _ = tiny_bf16()
    for mode, row in fp8_rows(run[0]).items():
        with vkern.patch(model, vkern.PatchConfig(fp8=mode)) as handle:
            installed = [n for n, m in model.named_modules() if isinstance(m, Fp8Linear)]
            count = handle.summary[f"Linear -> Fp8Linear ({mode})"]
        assert count == len(installed) == 10 * model.config.num_layers
        assert row["n_layers"] == row["n_targets"] == row["n_converted"] == count
        assert sorted(row["per_layer"]) == sorted(installed)
        assert sum(c["n"] for c in row["per_class"].values()) == count
        assert set(row["per_class"]) == {fqn.split(".", 2)[2] for fqn in installed}


@pytest.mark.parametrize("mode", ["storage", "compute"])
def test_sqnr_and_cosine_clear_the_floors(run, mode):
    row = fp8_rows(run[0])[mode]
    values = list(row["per_layer"].values())
    assert all(math.isfinite(v) for v in values)
    assert row["sqnr_min_db"] == min(values) == row["per_layer"][row["worst_layer"]]
    assert row["sqnr_min_db"] >= fp8_accuracy.SQNR_FLOOR_DB[mode] and row["pass_sqnr"]
    # the bf16 layer is the noise floor: far above either fp8 mode
    assert math.isfinite(row["bf16_sqnr_min_db"]) and row["bf16_sqnr_min_db"] > row["sqnr_max_db"] + 10
    assert row["cos"] >= fp8_accuracy.COS_FLOOR[mode] and row["pass_cos"]
    assert row["cos_vs_vkern"] >= fp8_accuracy.COS_FLOOR[mode] and row["pass_cos_vs_vkern"]
    assert 0 < row["rel_l2"] < 0.1


def test_compute_mode_is_noisier_than_storage(run):
    rows = fp8_rows(run[0])
    assert rows["compute"]["sqnr_median_db"] < rows["storage"]["sqnr_median_db"]


@pytest.mark.parametrize("broken", ["scale", "zeros"])
def test_a_broken_quantizer_is_caught(monkeypatch, broken):
    """The measured layer is the one vkern.patch.fp8.to_fp8 builds: break it and the SQNR drops below the floors."""
    from vkern.patch import fp8 as fp8_patch

    to_fp8 = fp8_patch.to_fp8

    def bad(linear, fqn, config):
        layer = to_fp8(linear, fqn, config)
        if broken == "scale":
            layer.weight_scale.mul_(1.1)  # a 10% scale error: ~20 dB
        else:
            layer.forward = lambda x: torch.zeros(*x.shape[:-1], layer.out_features, dtype=x.dtype)
        return layer

    monkeypatch.setattr(fp8_patch, "to_fp8", bad)
    model, inputs = tiny_bf16()
    _, per_layer, n_targets = fp8_accuracy.measure_layers(model, inputs)
    for mode in fp8_accuracy.MODES:
        stats = fp8_accuracy.mode_stats(per_layer, mode)
        assert stats["n_layers"] == n_targets[mode] == 20
        assert stats["sqnr_max_db"] < fp8_accuracy.SQNR_FLOOR_DB["compute"], (broken, mode, stats["sqnr_max_db"])
    if broken == "zeros":
        assert all(abs(r[m]) < 1e-9 for r in per_layer.values() for m in fp8_accuracy.MODES)  # 10 log10(1) = 0 dB


def test_a_layer_called_twice_is_an_error():
    class Output:
        def __init__(self, sample):
            self.sample = sample

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32).to(torch.bfloat16)

        def forward(self, x):
            return Output(self.proj(self.proj(x)))

    with pytest.raises(RuntimeError, match="proj: called twice"):
        fp8_accuracy.measure_layers(Twice(), dict(x=torch.randn(4, 32, dtype=torch.bfloat16)))


def test_sqnr_sums_in_chunks_equal_one_pass():
    x = torch.randn(2, 37, 48, dtype=torch.bfloat16)
    linear = nn.Linear(48, 24).to(torch.bfloat16)
    noisy = linear(x) + 0.01 * torch.randn(2, 37, 24)
    whole = fp8_accuracy.error_sums(x, linear.weight, linear.bias, [noisy], chunk_rows=1000)
    chunked = fp8_accuracy.error_sums(x, linear.weight, linear.bias, [noisy], chunk_rows=5)
    # chunks change only the fp32 GEMM's blocking (summation order): agree to fp32 rounding
    assert whole[0] == pytest.approx(chunked[0], rel=1e-6) and whole[1][0] == pytest.approx(chunked[1][0], rel=1e-5)
    signal = x.double() @ linear.weight.double().T + linear.bias.double()
    assert whole[0] == pytest.approx(signal.square().sum().item(), rel=1e-5)


def test_big_sizes_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(SystemExit, match="need a CUDA GPU"):
        fp8_accuracy.main(["--size", "14b", "--device", "cpu"])
