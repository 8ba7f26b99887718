"""The benchmark harness (`benchmarks/run.py`, `plot.py`) end to end on a CPU in `--smoke` mode: the results schema,
FLOP counting, OOM / error / time-budget records, the profiler helper, the plots and the README table."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# Everything except the compiled variant (tests/test_compile.py covers compilation; a CPU compile costs ~20 s) and
# the optional flash-attn kernels (CUDA only).
SMOKE_IMPLS = ("hf-flash-perceiver,hf-flash-perceiver+xattn-ckpt,hf-flash-perceiver+varlen,"
               "hf-flash-perceiver+fused-branches,hf-flash-perceiver+torch-norm,"
               "perceiver-pytorch,"
               "transformers-perceiver")
HAS_PERCEIVER_PYTORCH = importlib.util.find_spec("perceiver_pytorch") is not None


def _load(name: str):
    # Unique module names: `run`/`plot` are common file names elsewhere.
    spec = importlib.util.spec_from_file_location(f"hf_flash_perceiver_benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = _load("run")
plot = _load("plot")
report = sys.modules["bench_report"]


def smoke(out_dir: Path, *extra: str) -> dict:
    return run.main(["--smoke", "--device", "cpu", "--out-dir", str(out_dir), "--iters", "2", "--warmup", "1",
                     *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    results = smoke(out_dir, "--impls", SMOKE_IMPLS, "--profile", "seed:64")
    return out_dir, results


def _measured(records, **match):
    return [r for r in records if report.measured(r) and all(r.get(k) == v for k, v in match.items())]


def test_smoke_writes_the_documented_schema(smoke_run):
    out_dir, results = smoke_run
    path = out_dir / f"{datetime.date.today().isoformat()}-cpu-smoke.json"
    assert path.exists()
    on_disk = json.loads(path.read_text())
    assert on_disk["records"] == results["records"]
    for key in ("card", "date", "torch", "transformers", "matmul_tflops", "notes", "records"):
        assert key in on_disk, key
    # Off the GPU there is no bf16 peak to measure MFU against: no ceiling, no MFU.
    assert on_disk["card"] == "cpu" and on_disk["matmul_tflops"] is None and on_disk["complete"] is True
    assert on_disk["notes"] and all(isinstance(n, str) for n in on_disk["notes"])

    records = on_disk["records"]
    assert {r["config"] for r in records} == {"seed", "io", "masked", "large"}
    for r in records:
        for key in report.REQUIRED_RECORD_KEYS:
            assert key in r, (key, r)
        assert r["oom"] is False
        if r.get("skipped"):
            continue
        assert r["ms"] > 0 and r["flops"] > 0 and r["tflops_per_s"] > 0 and r["mfu"] is None, r
        assert r["peak_gib"] is None  # CPU: no allocator statistics
        assert r["model"]["params"] > 0
        assert r["tflops_per_s"] == pytest.approx(r["flops"] / (r["ms"] / 1e3) / 1e12)

    # Every applicable impl ran at every smoke point (peers only where they apply).
    assert {r["impl"] for r in _measured(records, config="seed")} >= {"hf-flash-perceiver",
                                                                     "hf-flash-perceiver+xattn-ckpt",
                                                                     "hf-flash-perceiver+fused-branches",
                                                                     "hf-flash-perceiver+torch-norm"}
    assert {r["impl"] for r in _measured(records, config="io")} == {"hf-flash-perceiver", "transformers-perceiver",
                                                                   "hf-flash-perceiver+fused-branches",
                                                                   "hf-flash-perceiver+torch-norm"}
    assert {r["impl"] for r in _measured(records, config="large")} == {"hf-flash-perceiver",
                                                                      "hf-flash-perceiver+fused-branches",
                                                                      "hf-flash-perceiver+torch-norm"}
    for impl in ("hf-flash-perceiver", "hf-flash-perceiver+varlen", "hf-flash-perceiver+fused-branches"):
        pair = _measured(records, config="masked", impl=impl)
        assert sorted(r["masked"] for r in pair) == [False, True]
        masked = next(r for r in pair if r["masked"])
        assert 0.25 <= masked["valid_fraction"] < 1.0

    pp = [r for r in records if r["impl"] == "perceiver-pytorch"]
    assert {r["config"] for r in pp} == {"seed", "masked"}
    if HAS_PERCEIVER_PYTORCH:
        assert all(report.measured(r) for r in pp)
    else:  # a missing peer is a skipped record that says how to install it, never a crash
        assert all("pip install perceiver-pytorch" in r["skipped"] for r in pp)

    tf = _measured(records, impl="transformers-perceiver")[0]
    assert tf["model"]["transformers_channels"]["self_v_head_dim"] > 0


def test_flops_include_the_cross_attention(smoke_run):
    """The counted FLOPs grow with n by at least the cross-attention's attention matmuls plus the forward key/value
    projection: a count that missed the fused attention kernel would fall short of this."""
    _, results = smoke_run
    shape = run.SMOKE_CONFIGS["seed"].shape
    by_n = {r["n"]: r for r in _measured(results["records"], config="seed", impl="hf-flash-perceiver")}
    (n0, r0), (n1, r1) = sorted(by_n.items())
    assert r0["batch"] == r1["batch"]
    per_token_per_layer = (r1["flops"] - r0["flops"]) / (r0["batch"] * shape.depth * (n1 - n0))
    inner = shape.cross_heads * shape.cross_head_dim
    attention = 3 * 2 * 2 * shape.num_latents * inner  # QK^T and PV, forward + backward (x3)
    kv_forward = 2 * shape.input_dim * 2 * inner
    assert per_token_per_layer >= attention + kv_forward
    # Every variant of ours is the same model: one shared count.
    for r in _measured(results["records"], config="seed", impl="hf-flash-perceiver+xattn-ckpt"):
        assert r["flops"] == by_n[r["n"]]["flops"]


def test_profile_writes_a_kernel_table(smoke_run):
    out_dir, results = smoke_run
    assert len(results["profiles"]) == 1
    text = (out_dir / results["profiles"][0]).read_text()
    assert text.startswith("# hf-flash-perceiver, config seed")
    assert "aten::" in text and "Self CPU" in text
    assert "# Device activities per step, by the op that issued them\n(no device activities: a CPU run)" in text


def test_profiled_steps_follow_the_encoder_capture(monkeypatch):
    """A profile warms up past the encoder's eager calls and its capture, however many eager calls that takes, so
    that the profiled steps are replays, the step the timings measure (not a mix of eager and replayed steps)."""
    from hf_flash_perceiver import encoder_graphs

    for calls in (2, 5):
        monkeypatch.setattr(encoder_graphs, "WARMUP_CALLS", calls)
        assert run.profile_warmup() == calls + 2


def test_launch_attribution_counts_each_activity_under_its_issuing_op():
    """Each device activity counts once per step under the op that launched it, named with its parents."""
    from types import SimpleNamespace

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernel, memset = SimpleNamespace(name="gemm_kernel"), SimpleNamespace(name="Memset (Device)")
    backward = SimpleNamespace(name="AddmmBackward0", cpu_parent=None, device_type=cpu, kernels=[])
    mm = SimpleNamespace(name="aten::mm", cpu_parent=backward, device_type=cpu, kernels=[kernel])
    total = SimpleNamespace(name="aten::sum", cpu_parent=backward, device_type=cpu, kernels=[memset, kernel])
    device_side = SimpleNamespace(name="gemm_kernel", cpu_parent=None, device_type=cuda, kernels=[])
    rows = run.launch_attribution([backward, mm, total, device_side] * 2, steps=2)
    assert rows == [
        (1.0, "Memset (Device)", "aten::sum < AddmmBackward0"),
        (1.0, "gemm_kernel", "aten::mm < AddmmBackward0"),
        (1.0, "gemm_kernel", "aten::sum < AddmmBackward0"),
    ]
    text = run.format_attribution(rows)
    assert text.startswith("3.0 device activities per step")
    assert "Memset (Device)  <-  aten::sum < AddmmBackward0" in text


class _Exploding(nn.Module):
    def __init__(self, exc: Exception):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.exc = exc

    def forward(self, inputs, mask=None):
        raise self.exc


def test_oom_and_errors_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    for impl, exc in (("hf-flash-perceiver+xattn-ckpt", oom), ("transformers-perceiver", ValueError("bad shape"))):
        monkeypatch.setitem(run.IMPLS, impl, dataclasses.replace(run.IMPLS[impl], build=lambda s, a, e=exc: _Exploding(e)))
    results = smoke(tmp_path, "--configs", "seed,io", "--ns", "64",
                    "--impls", "hf-flash-perceiver,hf-flash-perceiver+xattn-ckpt,transformers-perceiver")
    by_impl = {(r["impl"], r["config"]): r for r in results["records"]}
    ckpt = by_impl["hf-flash-perceiver+xattn-ckpt", "seed"]
    assert ckpt["oom"] is True and ckpt["ms"] is None and "error" not in ckpt
    assert "out of memory" in ckpt["oom_message"]
    tf = by_impl["transformers-perceiver", "io"]
    assert tf["oom"] is False and tf["ms"] is None and tf["error"] == "ValueError: bad shape"
    # The records after each failure were still measured.
    assert report.measured(by_impl["hf-flash-perceiver", "io"])
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["records"] == results["records"]


def test_a_spent_time_budget_skips_records_but_writes_the_file(tmp_path):
    results = smoke(tmp_path, "--configs", "seed", "--impls", "hf-flash-perceiver", "--time-budget-s", "0")
    assert results["records"] and all(r["skipped"].startswith("time budget") for r in results["records"])
    assert results["complete"] is False
    assert all(r["ms"] is None and r["oom"] is False for r in results["records"])
    assert json.loads(next(tmp_path.glob("*.json")).read_text())["complete"] is False


def test_harness_switches_turn_package_switches_off_around_a_forward():
    """An A/B variant turns its package switches off for its own forwards only, and names only real switches."""
    import importlib

    from bench_peers import SWITCHES, HFFlashPerceiver

    seen = []

    def setting(name):
        return importlib.import_module(f"hf_flash_perceiver.{name}").enabled

    class Probe(nn.Module):
        def forward(self, inputs, attention_mask=None):
            seen.append({name: setting(name) for name in SWITCHES})
            return type("Out", (), {"last_hidden_state": inputs})()

    before = {name: setting(name) for name in SWITCHES}
    HFFlashPerceiver(Probe(), disabled=("fused_norm", "encoder_graphs"))(torch.zeros(1))
    assert seen[-1] == {**before, "fused_norm": False, "encoder_graphs": False}
    assert {name: setting(name) for name in SWITCHES} == before
    with pytest.raises(ValueError, match="disabled names switches"):
        HFFlashPerceiver(Probe(), disabled=("fused_nrom",))


def test_cli_rejects_unknown_names():
    for argv in (["--impls", "hf-flash-perceiver,nope"], ["--configs", "huge"], ["--profile", "seed"],
                 ["--compile-points", "seed4096"]):
        with pytest.raises(SystemExit):
            run.parse_args(argv)


def test_compile_points_must_be_record_points(tmp_path):
    with pytest.raises(SystemExit, match="not one of"):
        smoke(tmp_path, "--configs", "seed", "--impls", "hf-flash-perceiver+compile", "--compile-points", "seed:65")


def _markdown_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith(("| impl", "| ---"))]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_plot_renders_pngs_and_the_readme_table(smoke_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out_dir, results = smoke_run
    path = next(out_dir.glob("*-smoke.json"))
    assert plot.main([str(path), "--markdown", "--out-dir", str(tmp_path)]) == 0
    for suffix in ("speedup", "memory"):
        png = tmp_path / f"{path.stem}-{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    out = capsys.readouterr().out
    assert ("| impl | config | n | batch | ms | peak GiB | TFLOP/s | MFU | speedup vs peer | kernels/step | device ms | "
            "host ms |") in out
    assert "no MFU off the GPU" in out
    rows = _markdown_rows(out)
    assert len(rows) == len(results["records"])
    # A CPU run has no MFU, no kernel count and no device time; the host time is measured everywhere.
    assert all(row[7] == row[9] == row[10] == "—" for row in rows)
    assert all(row[11] != "—" for row in rows if row[4] not in ("skipped", "OOM", "error"))
    io_ours = [row for row in rows if row[0] == "hf-flash-perceiver" and row[1] == "io"]
    assert io_ours and all(row[8].endswith("x transformers-perceiver") for row in io_ours)
    ratio = float(io_ours[0][8].split("x")[0])
    record = _measured(results["records"], impl="hf-flash-perceiver", config="io", n=int(io_ours[0][2]))[0]
    peer = _measured(results["records"], impl="transformers-perceiver", config="io", n=record["n"])[0]
    assert ratio == pytest.approx(peer["ms"] / record["ms"], abs=0.006)


def test_plot_without_matplotlib_still_prints_the_table(smoke_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = next(smoke_run[0].glob("*-smoke.json"))
    assert plot.main([str(path), "--markdown", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PNGs skipped" in out and "| impl | config |" in out
    assert not list(tmp_path.glob("*.png"))


def _record(impl, config, n, ms, **kw):
    return {"impl": impl, "config": config, "n": n, "batch": 8, "ms": ms, "masked": False, "oom": False,
            "peak_gib": None, "tflops_per_s": None, "mfu": None, **kw}


def test_summary_compares_against_the_right_peer_and_target():
    records = [
        _record("hf-flash-perceiver", "seed", 4096, 10.0, mfu=0.40, kernels_per_step=900.0, host_ms=12.0,
                device_ms=9.5),
        _record("hf-flash-perceiver+compile", "seed", 4096, 15.0, kernels_per_step=300.0),
        _record("perceiver-pytorch", "seed", 4096, 60.0),
        _record("hf-flash-perceiver", "io", 4096, 10.0),
        _record("transformers-perceiver", "io", 4096, 20.0),
        _record("hf-flash-perceiver", "seed", 131072, 50.0, peak_gib=1.5),
        _record("hf-flash-perceiver", "masked", 4096, 12.0, masked=True),
        _record("hf-flash-perceiver", "masked", 4096, 10.0),
        _record("hf-flash-perceiver", "large", 16384, 10.0, mfu=0.55),
    ]
    lines = "\n".join(report.summary_lines({"records": records}))
    # The default path is held to 3x, the opt-in fast variants to 5x.
    assert "seed   n=4096   B=8   hf-flash-perceiver:  6.00x perceiver-pytorch (target >= 3x: meets)" in lines
    assert "hf-flash-perceiver+compile:  4.00x perceiver-pytorch (target >= 5x: MISSES)" in lines
    assert "2.00x transformers-perceiver (target >= 3x: MISSES)" in lines
    assert "MFU 40.0% (target >= 35%: meets)" in lines
    assert "peak 1.50 GiB (target <= 1 GiB: MISSES)" in lines
    assert "masked/unmasked time 1.20x (target <= 1.1x: MISSES)" in lines
    assert "MFU 55.0% (target >= 50%: meets)" in lines
    assert "hf-flash-perceiver: 900 kernels/step (target <= 700: MISSES)" in lines
    assert "hf-flash-perceiver+compile: 300 kernels/step\n" in lines + "\n"  # variants: reported, no target
    assert "host 12.0 ms / device 9.5 ms per step (target host <= device: MISSES)" in lines
    table = report.markdown_table({"records": records, "card": "c", "date": "d", "torch": "t", "transformers": "x"})
    assert "| 6.00x perceiver-pytorch | 900 | 9.5 | 12.0 |" in table
    # No peer at another n: no ratio invented.
    assert report.speedup(records, records[5]) is None


def test_newest_results_prefers_real_runs_over_smoke(tmp_path):
    for name in ("2026-01-02-nvidia-h100-80gb-hbm3.json", "2026-03-01-cpu-smoke.json", "2025-12-31-nvidia-h200.json"):
        (tmp_path / name).write_text("{}")
    assert report.newest_results(tmp_path).name == "2026-01-02-nvidia-h100-80gb-hbm3.json"
    # The long-input, multi-GPU and attention-kernel scripts write other schemas into the same folder: never "the
    # newest results".
    for name in ("2026-02-01-nvidia-h200-long-inputs.json", "2026-02-01-nvidia-h200-multi-gpu.json",
                 "2026-02-01-nvidia-h200-attention-backends.json"):
        (tmp_path / name).write_text("{}")
    assert report.newest_results(tmp_path).name == "2026-01-02-nvidia-h100-80gb-hbm3.json"
    # A later run cut short by its time budget, or one whose peer was not installed, keeps its file but not the table.
    cut = {"complete": False, "records": []}
    no_peer = {"complete": True, "records": [{"impl": "perceiver-pytorch", "skipped": "perceiver-pytorch is not installed"}]}
    # So does a run scoped to some configs or variants (an A/B), even when it measured all it was asked for.
    scoped = {"complete": True, "argv": ["--configs", "seed", "--impls", "hf-flash-perceiver,perceiver-pytorch"],
              "records": []}
    for name, payload in (("2026-04-01-nvidia-h200.json", cut), ("2026-04-02-nvidia-h200.json", no_peer),
                          ("2026-04-02-nvidia-h200-ab.json", scoped)):
        (tmp_path / name).write_text(json.dumps(payload))
    assert report.newest_results(tmp_path).name == "2026-01-02-nvidia-h100-80gb-hbm3.json"
    (tmp_path / "2026-04-03-nvidia-h200.json").write_text(json.dumps({"complete": True, "records": [],
                                                                      "argv": ["--time-budget-s", "400"]}))
    assert report.newest_results(tmp_path).name == "2026-04-03-nvidia-h200.json"
    # A complete run made with a package switch set against its default for all of it is not the default path: never
    # the table.
    (tmp_path / "2026-04-04-nvidia-h200-encoder-graphs-on.json").write_text(json.dumps({"complete": True, "records": []}))
    assert report.newest_results(tmp_path).name == "2026-04-03-nvidia-h200.json"


def test_smoke_defaults_write_outside_the_results_and_leave_out_compilation(monkeypatch, capsys):
    """A bare `--smoke` run must not land in benchmarks/results/ (plot.py renders the newest file there), and runs
    only the eager variants (a CPU compilation alone takes longer than the rest of the run)."""
    args = run.parse_args(["--smoke"])
    assert args.out_dir is None and not args.impls_given
    measured_jobs = []
    monkeypatch.setattr(run, "run_job", lambda ctx, job: measured_jobs.append(job)
                        or {**run.empty_record(job), "skipped": "not measured in this test"})
    results = run.main(["--smoke", "--device", "cpu", "--configs", "seed"])
    written = Path(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert written.exists() and run.RESULTS_DIR not in written.parents
    assert measured_jobs and not any(run.IMPLS[job.impl].compile for job in measured_jobs)
    # A/B variants of one package switch run only when named (each A/B is a scoped run of its own).
    assert not any(run.IMPLS[job.impl].ab for job in measured_jobs)
    assert {"hf-flash-perceiver+torch-norm", "hf-flash-perceiver+torch-activation",
            "hf-flash-perceiver+compile-max-autotune"} <= {name for name, spec in run.IMPLS.items() if spec.ab}
    assert results["matmul_tflops"] is None
    # Named explicitly, a compiled variant still runs in a smoke run, and an explicit --out-dir is used as given.
    measured_jobs.clear()
    explicit = written.parent / "explicit"
    run.main(["--smoke", "--device", "cpu", "--configs", "seed", "--impls", "hf-flash-perceiver+compile",
              "--out-dir", str(explicit)])
    assert {job.impl for job in measured_jobs} == {"hf-flash-perceiver+compile"}
    assert list(explicit.glob("*-cpu-smoke.json"))
    shutil.rmtree(written.parent)


def test_host_profile_smoke(capsys):
    host_profile = _load("host_profile")
    medians = host_profile.main(["tree-a", "--smoke"])
    out = capsys.readouterr().out
    assert set(medians) == {f"{cfg} {n}x{b}" for cfg, n, b in host_profile.SMOKE_POINTS}
    assert all(ms > 0 for ms in medians.values())
    # Each point: its median under the tag, then the profile of the harness's step by function.
    for point, ms in medians.items():
        assert f"=== tree-a {point}: host median {ms:.2f} ms" in out
    assert out.count("Ordered by: internal time") == len(medians) and "run_backward" in out


def test_host_profile_without_a_gpu_names_the_smoke_mode(monkeypatch, capsys):
    host_profile = _load("host_profile")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        host_profile.main(["tree-a"])
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU (or --smoke): torch sees none here" in capsys.readouterr().err


def test_memory_peak_replays_a_history_step_by_step():
    memory_peak = _load("memory_peak")
    mark = memory_peak.MARK_BYTES
    ours = [{"filename": "/x/hf_flash_perceiver/layers.py", "line": 7, "name": "forward"}]

    def alloc(addr, size, frames=()):
        return {"action": "alloc", "addr": addr, "size": size, "frames": list(frames)}

    def free(addr, size):
        return {"action": "free_completed", "addr": addr, "size": size}

    trace = [
        alloc(1, mark), free(1, mark),                       # step 0 begins
        alloc(10, 4096, ours), alloc(11, 1024), free(10, 4096),
        free(99, 2048),                                      # a block of the base (allocated before the history)
        alloc(1, mark + 512), free(1, mark + 512),           # step 1 begins
        alloc(12, 512, ours), free(12, 512),
    ]
    peaks = memory_peak.step_peaks(trace, base=10_000, steps=2)
    assert [p.step for p in peaks] == [0, 1]
    # Step 0 peaks with both of its blocks live on top of the base; the mark blocks never count.
    assert peaks[0].total == 10_000 + 4096 + 1024 and set(peaks[0].live) == {10, 11}
    # Step 1 starts from what step 0 left (base - 2048 freed + 1024 still live) and peaks with its one block.
    assert peaks[1].total == 10_000 - 2048 + 1024 + 512 and set(peaks[1].live) == {11, 12}
    grouped = memory_peak.by_frame(peaks[0].live.values())
    assert grouped[0] == ("layers.py:7 forward", 4096, 1)
    assert grouped[1][1:] == (1024, 1) and "no frame of this package" in grouped[1][0]


def test_memory_peak_without_a_gpu_says_it_needs_one(monkeypatch, capsys):
    memory_peak = _load("memory_peak")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        memory_peak.main([])
    assert exit_info.value.code == 2
    assert "needs a CUDA GPU: torch sees none here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, got", [(["--steps", "0"], "got --steps 0, --step None"),
                                       (["--steps", "3", "--step", "3"], "got --steps 3, --step 3")])
def test_memory_peak_refuses_a_step_it_will_not_record(argv, got, capsys):
    memory_peak = _load("memory_peak")
    with pytest.raises(SystemExit) as exit_info:
        memory_peak.main(argv)
    assert exit_info.value.code == 2
    assert f"--steps must be >= 1 and --step in [0, --steps); {got}" in capsys.readouterr().err


def test_long_inputs_smoke(tmp_path):
    long_inputs = _load("long_inputs")
    payload = long_inputs.main(["--smoke", "--device", "cpu", "--out-dir", str(tmp_path), "--iters", "1"])
    assert [(r["mode"], r["n"]) for r in payload["records"]] == [("infer", 2048), ("infer", 4096), ("train", 2048)]
    # Off the GPU there is no allocator peak to report; the time is real.
    assert all(r["seconds"] > 0 and r["peak_gib"] is None for r in payload["records"])
    (written,) = tmp_path.glob("*-cpu-long-inputs-smoke.json")
    assert json.loads(written.read_text())["records"] == payload["records"]


def test_multi_gpu_smoke_on_cpu_processes(tmp_path):
    # The multi-GPU harness end to end on 1 and 2 CPU processes (gloo): data-parallel throughput and a
    # context-parallel step, one JSON. Run as a script: its workers are spawned from `__main__`.
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(BENCH.parent)}
    done = subprocess.run([sys.executable, str(BENCH / "multi_gpu.py"), "--smoke", "--cp-tokens", "256",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = tmp_path.glob("*-cpu-multi-gpu-smoke.json")
    records = json.loads(written.read_text())["records"]
    assert [(r["mode"], r["world"]) for r in records] == [
        ("data_parallel", 1), ("context_parallel", 1), ("data_parallel", 2), ("context_parallel", 2)]
    assert all(r["samples_per_s"] > 0 for r in records if r["mode"] == "data_parallel")
    assert all(r["seconds"] > 0 and r["tokens_per_rank"] == 256 // r["world"] for r in records
               if r["mode"] == "context_parallel")
    assert records[2]["scaling_vs_1"] == pytest.approx(records[2]["samples_per_s"] / records[0]["samples_per_s"])


def test_pretrained_shapes_smoke(tmp_path):
    # transformers' class and this package's, converted from it, side by side on tiny shapes: one JSON, both timed.
    pretrained = _load("pretrained_shapes")
    payload = pretrained.main(["--smoke", "--out-dir", str(tmp_path), "--iters", "1", "--warmup", "0",
                               "--fused-branches", "--profile", "language"])
    assert [r["shape"] for r in payload["records"]] == ["vision-learned", "language"]
    for record in payload["records"]:
        for impl in ("transformers", "hf-flash-perceiver", "hf-flash-perceiver+fused-branches"):
            assert record[impl]["train_ms"] > 0 and record[impl]["infer_ms"] > 0
            assert record[impl]["train_peak_gib"] is None  # no allocator peak off the GPU
        assert record["train_speedup"] == pytest.approx(
            record["transformers"]["train_ms"] / record["hf-flash-perceiver"]["train_ms"])
        # Steps back to back (a training loop's timing) as well as alone, for both models.
        assert record["train_back_to_back_speedup"] == pytest.approx(
            record["transformers"]["train_back_to_back_ms"] / record["hf-flash-perceiver"]["train_back_to_back_ms"])
        assert record["fused_branches_train_speedup"] == pytest.approx(
            record["transformers"]["train_ms"] / record["hf-flash-perceiver+fused-branches"]["train_ms"])
        # One FLOP count (transformers' model) for every record's throughput; no MFU without a GPU's ceiling.
        assert record["train_flops"] > 0
        for impl in ("transformers", "hf-flash-perceiver"):
            assert record[impl]["train_tflops_per_s"] == pytest.approx(
                record["train_flops"] / record[impl]["train_ms"] / 1e9)
            assert record[impl]["train_mfu"] is None
    assert payload["matmul_tflops"] is None
    (written,) = tmp_path.glob("*-cpu-pretrained-shapes-smoke.json")
    assert json.loads(written.read_text())["records"] == payload["records"]
    # --profile: this package's training step at that shape only, as run.py's profiles (a table, then launches).
    (profile,) = tmp_path.glob("*-cpu-profile-pretrained-*.txt")
    text = profile.read_text()
    assert profile.name.endswith("-profile-pretrained-language.txt") and "pretrained shape language" in text
    assert "Self CPU" in text and "# Device activities per step" in text


def test_pretrained_shapes_flops_are_per_sample():
    # The step's FLOPs are counted at batch 1 and scaled by the batch: every op of both shapes works per sample.
    pretrained = _load("pretrained_shapes")
    import transformers

    for name, (config, size) in pretrained.shapes(smoke=True).items():
        cls = {"vision-learned": transformers.PerceiverForImageClassificationLearned,
               "language": transformers.PerceiverForMaskedLM}[name]
        model = cls(config)
        one, three = (pretrained.count_train_flops(model, pretrained.batch_for(name, size, b, config, "cpu")[0],
                                                   torch.device("cpu")) for b in (1, 3))
        assert one > 0 and three == 3 * one, (name, one, three)


def test_pretrained_shapes_ratios_per_variant():
    # Every variant gets its speedup (and memory ratio) over transformers' eager step; a failed variant gets none.
    pretrained = _load("pretrained_shapes")
    record = {
        "shape": "language",
        "transformers": {"train_ms": 90.0, "infer_ms": 30.0, "train_peak_gib": 8.0},
        "hf-flash-perceiver": {"train_ms": 60.0, "infer_ms": 20.0, "train_peak_gib": 5.0},
        "transformers+compile": {"train_ms": 45.0, "infer_ms": 15.0, "train_peak_gib": 6.0},
        "hf-flash-perceiver+compile-cudagraphs": {"train_ms": 30.0, "infer_ms": 10.0, "train_peak_gib": 4.0},
        "hf-flash-perceiver+compile": {"error": "BackendCompilerFailed: ..."},
    }
    pretrained.add_ratios(record)
    assert record["train_speedup"] == pytest.approx(1.5) and record["infer_speedup"] == pytest.approx(1.5)
    assert record["train_memory_ratio"] == pytest.approx(1.6)
    assert "train_back_to_back_speedup" not in record  # neither record timed its steps back to back
    assert record["compile_cudagraphs_train_speedup"] == pytest.approx(3.0)
    assert record["compile_cudagraphs_train_memory_ratio"] == pytest.approx(2.0)
    assert record["transformers_compile_train_speedup"] == pytest.approx(2.0)
    assert not any(key.startswith("compile_train") for key in record)


def test_trainer_throughput_refuses_unknown_impl():
    trainer = _load("trainer_throughput")
    with pytest.raises(SystemExit):
        trainer.main(["--smoke", "--impls", "eager,torch_compile_fast"])


def test_trainer_throughput_smoke(tmp_path):
    # Trainer.train itself (optimizer, clipping, dataloader) timed over the steps after warm-up, one JSON.
    from hf_flash_perceiver import encoder_graphs

    trainer = _load("trainer_throughput")
    before = encoder_graphs.enabled
    payload = trainer.main(["--smoke", "--out-dir", str(tmp_path), "--impls", "eager,eager_no_encoder_graphs"])
    record, no_graphs = payload["records"]
    assert record["impl"] == "eager" and record["steps_timed"] == 2 and record["samples_per_s"] > 0
    assert record["step_ms"] == pytest.approx(record["batch"] / record["samples_per_s"] * 1e3)
    assert record["vs_eager"] == 1.0 and record["peak_gib"] is None
    assert no_graphs["impl"] == "eager_no_encoder_graphs" and no_graphs["vs_eager"] > 0
    assert encoder_graphs.enabled == before  # the variant's switch is its own
    (written,) = tmp_path.glob("*-cpu-trainer-smoke.json")
    assert json.loads(written.read_text())["records"] == payload["records"]
