"""precision="auto": the probe's decision rule, its time budget, its failures, and what training logs."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from formerkit import precision as P
from formerkit.errors import ConfigError


def fake_measure(seconds: dict[str, float]):
    def measure(probe, names, rows, device, budget_s=P.BUDGET_S):
        return {n: (512, seconds[n]) for n in names}
    return measure


@pytest.mark.parametrize(("seconds", "expected"), [
    ({"fp32": 0.010, "bf16": 0.004}, "bf16"),  # bf16 much faster (AVX-512 BF16, AMX)
    ({"fp32": 0.010, "bf16": 0.020}, "fp32"),  # bf16 slower (AVX-512 without BF16)
    ({"fp32": 0.010, "bf16": 0.0095}, "fp32"),  # a near tie keeps fp32's accuracy
    ({"fp32": 0.010, "bf16": 0.80}, "fp32"),  # emulated bf16 (AVX2 only)
])
def test_auto_takes_the_measured_fastest(monkeypatch, seconds, expected):
    monkeypatch.setattr(P, "measure", fake_measure(seconds))
    choice = P.resolve_precision("auto", "cpu", d_model=64, d_ff=256, rows=4096)
    assert choice.precision == expected and choice.dtype == P.DTYPES[expected]
    line = choice.describe()
    assert line.startswith(f"precision {expected} (auto: measured on cpu")
    for name, s in seconds.items():  # the numbers behind the choice are in the log line
        assert f"{name} {s * 1e3:.2f} ms for 512 rows" in line


def test_cuda_prefers_bf16_over_a_barely_faster_fp16():
    choice = P.choose({"fp32": (512, 0.010), "bf16": (512, 0.0042), "fp16": (512, 0.0040)}, "cuda:0", "probe")
    assert choice.precision == "bf16"
    choice = P.choose({"fp32": (512, 0.010), "bf16": (512, 0.0080), "fp16": (512, 0.0040)}, "cuda:0", "probe")
    assert choice.precision == "fp16"


def test_candidates_are_compared_per_row_at_the_sizes_they_reached():
    # emulated bf16 only reached 16 rows in its share of the budget; per row it is 10x slower than fp32 at 512
    choice = P.choose({"fp32": (512, 0.020), "bf16": (16, 0.006)}, "cpu", "probe")
    assert choice.precision == "fp32" and "bf16 6.00 ms for 16 rows (9.60x per row)" in choice.describe()
    assert P.choose({"fp32": (512, 0.020), "bf16": (512, 0.016)}, "cpu", "probe", previous="fp32").precision == \
        "fp32"  # a resumed run keeps its earlier choice unless it is far slower


def test_explicit_precisions_are_kept_without_a_probe(monkeypatch):
    monkeypatch.setattr(P, "measure", lambda *a, **k: pytest.fail("an explicit precision must not be probed"))
    for name in ("fp32", "bf16", "fp16"):
        choice = P.resolve_precision(name, "cpu", d_model=64, d_ff=256, rows=16)
        assert choice.precision == name and choice.describe() == f"precision {name} (as configured)"


def test_unknown_precision_and_unsupported_bf16_are_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match='did you mean "bf16"'):
        P.resolve_precision("bf61", "cpu", d_model=64, d_ff=256, rows=16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(ConfigError, match=r"bf16 is not supported on cuda:0 \(Tesla T4\)"):
        P.check_precision("bf16", "cuda:0")
    assert P.candidates(torch.device("cuda")) == ["fp32", "fp16"]


def test_a_failing_probe_falls_back_to_fp32_with_one_warning(monkeypatch):
    class Broken:
        workload = "broken"

        def __init__(self, *args):
            raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(P, "_TrainingProbe", Broken)
    with pytest.warns(UserWarning, match="probe failed.*no kernel") as record:
        choice = P.resolve_precision("auto", "cpu", d_model=64, d_ff=256, rows=16)
    assert len(record) == 1
    assert choice.precision == "fp32" and "the probe failed" in choice.describe()


def test_a_candidate_that_fails_is_left_out(monkeypatch):
    calls = []

    def probe(name, rows):
        calls.append((name, rows))
        if name == "bf16":
            raise RuntimeError("bf16 missing")

    with pytest.warns(UserWarning, match="bf16 failed"):
        measured = P.measure(probe, ["fp32", "bf16"], 64, torch.device("cpu"))
    assert list(measured) == ["fp32"] and measured["fp32"][0] == 64


def test_the_probe_stops_growing_before_a_slow_candidate_overruns_the_budget():
    def probe(name, rows):  # bf16 emulated: 100x slower, proportional to rows
        time.sleep(rows * (1e-4 if name == "bf16" else 1e-6))

    start = time.perf_counter()
    measured = P.measure(probe, ["fp32", "bf16"], 4096, torch.device("cpu"), budget_s=0.1)
    assert time.perf_counter() - start < 0.3
    (fp32_rows, fp32_s), (bf16_rows, bf16_s) = measured["fp32"], measured["bf16"]
    assert bf16_rows < fp32_rows and bf16_s / bf16_rows > 10 * fp32_s / fp32_rows
    cheap = P.measure(lambda name, rows: None, ["fp32", "bf16"], 4096, torch.device("cpu"))
    assert cheap["fp32"][0] == cheap["bf16"][0] == 4096  # when every size is cheap, both reach the real row count


def test_the_real_probe_is_quick_and_reports_its_numbers():
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = P.resolve_precision("auto", "cpu", d_model=128, d_ff=512, rows=4096)
    assert time.perf_counter() - start < 1.0
    assert choice.precision in ("fp32", "bf16") and set(choice.measured) == {"fp32", "bf16"}
    assert all(s > 0 and 16 <= rows <= P.MAX_TRAIN_ROWS for rows, s in choice.measured.values())
    inference = P.resolve_precision("auto", "cpu", d_model=128, d_ff=512, rows=1, training=False)
    assert {rows for rows, _ in inference.measured.values()} == {1}
    assert "feed-forward forward: fp32" in inference.describe()
