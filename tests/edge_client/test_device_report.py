"""The device report: the Jetson probe on a real file layout, the CPU probe here, the memory and cost
models by hand, measurements on a tiny model (and their cache), and ``fedbe-edge profile``."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from edge_client import cli, device_report, measure
from edge_client.hardware import DeviceInfo, probe_device, read_sysfs_text
from edge_client.step_cost import BACKWARD_PER_FORWARD, EXTRA_PER_TRAINED_BLOCK, StepTimeModel, memory_model
from fedbe import expansion, quantization, sources
from fedbe.blocks import get_block_state
from fedbe.device_profile import DeviceProfile, EmulationSettings
from fedbe.errors import FedbeError
from fedbe.protocol import AnnounceMessage, decode, encode

JETSON = Path(__file__).resolve().parents[1] / "fixtures" / "jetson"
REAL_BUSY_REASON = measure.busy_reason  # the autouse fixture below replaces it in every test


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Single-threaded torch (tiny ops on a shared 2-core box) and a private measurement cache."""
    monkeypatch.setattr(measure, "measurement_cache_dir", lambda: tmp_path / "measurement-cache")
    monkeypatch.setattr(measure, "busy_reason", lambda: None)  # the machine's own load: its own test
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- probing ---------------------------------------------------------------------------------------


def test_jetson_fixture_tree_is_read_to_the_expected_numbers() -> None:
    info = probe_device(sysfs_root=JETSON, proc_root=JETSON / "proc", probe_quantization=False)
    assert info.kind == "jetson"
    assert info.name == "NVIDIA Jetson AGX Orin Developer Kit"  # trailing NUL stripped
    assert info.memory_total_bytes == 64335836 * 1024
    assert info.memory_available_bytes == 58972432 * 1024
    assert info.details == "L4T R35.4.1"
    assert info.gpu is not None
    assert info.gpu.node == "17000000.ga10b"  # not the busier video compositor that sorts first
    assert info.gpu.load == pytest.approx(0.287)
    assert info.gpu.cur_freq_hz == 624_750_000 and info.gpu.max_freq_hz == 1_300_500_000
    if not torch.cuda.is_available():
        assert info.torch_device == "cpu" and info.bf16  # Ampere has bf16


def test_jetson_found_by_its_gpu_node_alone(tmp_path: Path) -> None:
    """Newer L4T names the node 17000000.gpu; of_node/name may end in a newline instead of a NUL."""
    root = tmp_path / "root"
    shutil.copytree(JETSON, root)
    (root / "proc" / "device-tree" / "model").unlink()
    (root / "etc" / "nv_tegra_release").unlink()
    devfreq = root / "sys" / "class" / "devfreq"
    (devfreq / "17000000.ga10b").rename(devfreq / "17000000.gpu")
    (devfreq / "17000000.gpu" / "device" / "of_node" / "name").write_bytes(b"gv11b\x00\n")
    info = probe_device(sysfs_root=root, proc_root=root / "proc", probe_quantization=False)
    assert info.kind == "jetson" and "gv11b" in info.name and info.details == ""
    assert info.gpu is not None and info.gpu.node == "17000000.gpu"
    if not torch.cuda.is_available():
        assert not info.bf16  # Volta has no bf16


def test_no_jetson_files_means_no_jetson(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    info = probe_device(sysfs_root=tmp_path, proc_root=tmp_path / "proc", probe_quantization=False)
    assert info.kind in ("cpu", "cuda")


def test_sysfs_text_is_stripped_of_nul_and_newline(tmp_path: Path) -> None:
    path = tmp_path / "name"
    path.write_bytes(b"ga10b\x00\n")
    assert read_sysfs_text(path) == "ga10b"
    assert read_sysfs_text(tmp_path / "missing") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_probe_on_this_machine() -> None:
    info = probe_device()
    memory = psutil.virtual_memory()
    assert info.kind == "cpu" and info.torch_device == "cpu"
    assert info.name and not info.name.isdigit()
    assert info.memory_total_bytes == memory.total
    assert 0 < info.memory_available_bytes <= info.memory_total_bytes
    assert abs(info.memory_available_bytes - memory.available) < memory.total * 0.2
    assert set(info.quantization) == {"nf4", "int8"}
    assert all(isinstance(v, bool) for v in info.quantization.values())
    assert set(info.quantization_errors) == {k for k, ok in info.quantization.items() if not ok}


def test_missing_nvml_is_logged_at_debug_not_warning(caplog: pytest.LogCaptureFixture) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("NVML works on this machine")
    except pynvml.NVMLError:
        pass
    caplog.set_level(logging.DEBUG, logger="edge_client")
    probe_device(probe_quantization=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("NVML" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


# --- the pure models -------------------------------------------------------------------------------


def test_memory_model_by_hand() -> None:
    model = memory_model(
        base_bytes=1000,
        fixed_bytes=100,
        block_params=10,
        activation_bytes_per_layer=50,
        num_layers=8,
        new_layer_indices=[5, 2, 7],
    )
    assert model.block_bytes == 160 and model.static_bytes == 1100
    assert model.required_bytes([7]) == 1100 + 160 + 50 * 1
    assert model.required_bytes([2, 5]) == 1100 + 2 * 160 + 50 * 6
    # worst case for n blocks: the lowest new block (layer 2) among them -> 1100 + 160 n + 300
    assert model.max_trainable_blocks(1100 + 3 * 160 + 300) == 3
    assert model.max_trainable_blocks(1100 + 2 * 160 + 300) == 2
    assert model.max_trainable_blocks(1100 + 2 * 160 + 299) == 1
    assert model.max_trainable_blocks(1100 + 160 + 299) == 0
    assert model.fits([7], 1310) and not model.fits([7], 1309)
    with pytest.raises(FedbeError, match="not distinct new blocks"):
        model.required_bytes([3])
    with pytest.raises(FedbeError, match="not distinct new blocks"):
        model.required_bytes([5, 5])
    with pytest.raises(FedbeError, match="at least one"):
        model.required_bytes([])
    with pytest.raises(FedbeError, match="block_params"):
        memory_model(
            base_bytes=1,
            fixed_bytes=0,
            block_params=-1,
            activation_bytes_per_layer=0,
            num_layers=2,
            new_layer_indices=[1],
        )


def test_cost_model_by_hand() -> None:
    cost = StepTimeModel(block_step_seconds=2.0, layer_forward_seconds=0.1, top_layer_index=7)
    assert cost.step_seconds(7, 1) == 2.0
    expected = 2.0 + 5 * BACKWARD_PER_FORWARD * 0.1 + 2 * EXTRA_PER_TRAINED_BLOCK * 0.1
    assert cost.step_seconds(2, 3) == pytest.approx(expected)
    assert cost.slowed(3.0).step_seconds(2, 3) == pytest.approx(3 * expected)
    assert cost.step_seconds(2, 1) > cost.step_seconds(5, 1) > cost.step_seconds(7, 1)
    with pytest.raises(FedbeError):
        cost.step_seconds(8, 1)
    with pytest.raises(FedbeError):
        cost.step_seconds(2, 0)


# --- measurements on a tiny model ------------------------------------------------------------------


@pytest.fixture
def tiny() -> tuple[torch.nn.Module, expansion.BlockRegistry]:
    model = sources.build_tiny_model("llama")
    registry = expansion.expand_model(model, expansion.plan_expansion(4, 4, "interleave"))  # new at 1,3,5,7
    quantization.freeze_base(model, registry, "nf4")
    return model, registry


def test_measure_compute_is_positive_and_cached(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    model, registry = tiny
    before = get_block_state(model, registry)
    first = device_report.measure_compute(model, registry, 2, 16, "nf4")
    assert not first.cached
    assert first.block_step_seconds > 0 and first.layer_forward_seconds > 0 and first.forward_seconds > 0
    after = get_block_state(model, registry)
    assert all(torch.equal(before[b][n], after[b][n]) for b in before for n in before[b])  # restored
    assert not any(p.requires_grad for p in model.parameters())

    def no_benchmark(*_: object, **__: object) -> None:
        raise AssertionError("the cached call ran the benchmark")

    monkeypatch.setattr(measure, "benchmark_compute", no_benchmark)
    second = device_report.measure_compute(model, registry, 2, 16, "nf4")
    assert second.cached and second.block_step_seconds == first.block_step_seconds
    with pytest.raises(AssertionError, match="ran the benchmark"):
        device_report.measure_compute(model, registry, 2, 16, "nf4", use_cache=False)
    with pytest.raises(AssertionError, match="ran the benchmark"):  # another shape is another key
        device_report.measure_compute(model, registry, 3, 16, "nf4")


def test_a_timing_taken_on_a_busy_machine_is_used_but_not_cached(
    tiny, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model, registry = tiny
    monkeypatch.setattr(measure, "busy_reason", lambda: "load average 9.0 on 2 cores")
    with caplog.at_level("WARNING", logger=measure.log.name):
        first = device_report.measure_compute(model, registry, 2, 16, "nf4")
    assert not first.cached and first.block_step_seconds > 0
    assert "not cached" in caplog.text and "load average 9.0 on 2 cores" in caplog.text
    monkeypatch.setattr(measure, "busy_reason", lambda: None)
    second = device_report.measure_compute(model, registry, 2, 16, "nf4")
    assert not second.cached  # nothing was kept from the busy run: measured again, and now kept
    assert device_report.measure_compute(model, registry, 2, 16, "nf4").cached


@pytest.mark.parametrize(("load", "busy"), [(0.5, False), (2.0, False), (2.5, True)])
def test_busy_means_more_load_than_cores(monkeypatch: pytest.MonkeyPatch, load: float, busy: bool) -> None:
    monkeypatch.setattr(measure.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(measure.os, "sched_getaffinity", lambda _pid: {0, 1})
    reason = REAL_BUSY_REASON()
    assert (reason is not None) is busy
    if busy:
        assert reason == "load average 2.5 on 2 cores"


def test_a_timing_of_another_matmul_path_is_not_reused(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    # 16-bit bases multiply in fp32 on CPUs without native 16-bit matmuls (14-47x
    # faster there); timings cached before must not plan a run of the new path
    model, registry = tiny
    monkeypatch.setenv("FEDBE_HALF_MATMUL", "native")
    native = device_report.measure_compute(model, registry, 2, 16, "nf4")
    monkeypatch.setenv("FEDBE_HALF_MATMUL", "fp32")
    assert not device_report.measure_compute(model, registry, 2, 16, "nf4").cached  # another key
    assert device_report.measure_compute(model, registry, 2, 16, "nf4").cached
    monkeypatch.setenv("FEDBE_HALF_MATMUL", "native")
    again = device_report.measure_compute(model, registry, 2, 16, "nf4")
    assert again.cached and again.block_step_seconds == native.block_step_seconds
    key = measure._cache_key("compute", model, registry, "nf4", 2, 16)
    assert key["half_matmul"] == "native" and key["version"] == measure.CACHE_VERSION == 2


def test_activation_memory_is_linear_in_depth_and_batch(tiny) -> None:
    model, registry = tiny
    act = device_report.measure_activations(model, registry, 2, 16, "nf4", use_cache=False)
    assert act.activation_bytes_per_layer > 0 and act.fixed_bytes > 0
    # a third position, not used for the fit, lies on the same line
    batch = measure._random_batch(model, 2, 16)
    top_saved, logits = measure.saved_tensor_bytes(model, registry, 3, batch)
    mid_saved, _ = measure.saved_tensor_bytes(model, registry, 1, batch)
    fixed_saved = act.fixed_bytes - 2 * logits
    predicted = fixed_saved + act.activation_bytes_per_layer * (registry.num_layers - 3)
    assert mid_saved == pytest.approx(predicted, rel=0.02)
    assert mid_saved - top_saved == pytest.approx(act.activation_bytes_per_layer * 4, rel=0.02)
    double = device_report.measure_activations(model, registry, 4, 16, "nf4", use_cache=False)
    assert double.activation_bytes_per_layer == pytest.approx(2 * act.activation_bytes_per_layer, rel=0.1)


def test_build_report_applies_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    device = DeviceInfo("cpu", "test CPU", 16 * 2**30, 8 * 2**30, "cpu", fp16=False, bf16=True)
    profile = DeviceProfile(
        name="dev",
        memory_reserve_bytes=2**30,
        link_bandwidth_mbps=1000.0,
        emulate=EmulationSettings(
            memory_cap_bytes=2**20 * 40, compute_slowdown=3.0, link_bandwidth_mbps=20.0
        ),
    )
    kwargs = {"n_blocks": 2, "batch_size": 2, "max_tokens": 16, "device": device}
    real = device_report.build_report(profile, "tiny:llama", **kwargs)  # type: ignore[arg-type]
    emulated = device_report.build_report(profile, "tiny:llama", emulating=True, **kwargs)  # type: ignore[arg-type]
    assert emulated.measured.cached  # same model and shape: measured once
    assert real.memory_budget_bytes == 7 * 2**30 and emulated.memory_budget_bytes == 40 * 2**20
    assert real.link_bandwidth_bps == 1e9 and emulated.link_bandwidth_bps == 2e7
    assert emulated.cost.block_step_seconds == pytest.approx(3 * real.cost.block_step_seconds)
    assert emulated.cost.layer_forward_seconds == pytest.approx(3 * real.measured.layer_forward_seconds)
    assert real.new_layer_indices == (2, 5) and real.max_trainable_blocks == 2
    fields = emulated.to_announce_fields()
    message = AnnounceMessage(
        client_id="c1", profile_name="dev", num_examples=3, label_histogram={"a": 3.0}, base_fingerprint="f",
        **fields,  # type: ignore[arg-type]
    )  # fmt: skip
    assert decode(encode(message)) == message
    assert fields["base_memory_bytes"] == emulated.memory.base_bytes + emulated.memory.fixed_bytes


# --- the command -----------------------------------------------------------------------------------

REQUIRED_KEYS = {
    "device_kind", "device_name", "memory_total_bytes", "memory_available_bytes", "memory_budget_bytes",
    "quantization", "block_step_seconds", "layer_forward_seconds", "max_trainable_blocks", "base_memory_bytes",
    "block_memory_bytes", "activation_bytes_per_layer", "step_seconds_by_block",
}  # fmt: skip


def _profile_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert cli.main(["profile", "--json", *args]) == 0
    captured = capsys.readouterr()
    assert "[profile]" in captured.err  # progress goes to stderr, stdout is only the JSON
    return json.loads(captured.out)


def test_profile_json_on_a_tiny_model(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile_json(capsys, "--model", "tiny:llama", "--batch-size", "2", "--max-tokens", "16")
    assert set(out) >= REQUIRED_KEYS
    assert out["device_kind"] in ("cpu", "cuda", "jetson")
    assert isinstance(out["quantization"], dict) and set(out["quantization"]) == {"nf4", "int8"}
    assert 0 < out["memory_available_bytes"] <= out["memory_total_bytes"]  # type: ignore[operator]
    assert out["memory_budget_bytes"] == out["memory_available_bytes"]  # no profile: all that is free
    assert out["max_trainable_blocks"] == 4 and out["num_layers"] == 8  # min(6, 4 layers) blocks, all fit
    assert out["block_step_seconds"] > 0 and out["layer_forward_seconds"] > 0  # type: ignore[operator]
    assert out["block_memory_bytes"] > 0 and out["activation_bytes_per_layer"] > 0  # type: ignore[operator]
    costs = out["step_seconds_by_block"]
    assert isinstance(costs, list) and [c["layer_index"] for c in costs] == [1, 3, 5, 7]
    assert costs[0]["step_seconds"] > costs[-1]["step_seconds"] == out["block_step_seconds"]


def test_profile_table_and_emulation(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("name: small\nemulate:\n  memory_cap_bytes: 1MiB\n  compute_slowdown: 2\n")
    args = [
        "profile",
        "--model",
        "tiny:llama",
        "--batch-size",
        "2",
        "--max-tokens",
        "16",
        "--profile",
        str(path),
    ]
    assert cli.main([*args, "--emulate"]) == 0
    table = capsys.readouterr().out
    assert "max blocks   0" in table and "emulated 2.0x slower" in table and "block  layer" in table


@pytest.mark.parametrize(
    ("profile_text", "expected"),
    [(None, "not found"), ("name: x\nbatch_size: -3\n", "'batch_size'")],
)
def test_profile_errors_exit_1_without_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, profile_text: str | None, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    if profile_text is not None:
        path.write_text(profile_text)
    assert cli.main(["profile", "--model", "tiny:llama", "--profile", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err


def test_run_rejects_bad_input_before_touching_the_network(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "data.jsonl"
    bad.write_text('{"text": "no label here"}\nnot json\n')
    # port 9 (discard) on loopback: never contacted, because the data is checked first
    args = ["run", "--broker", "mqtt://127.0.0.1:9", "--client-id", "dev1", "--model", "tiny:llama"]
    assert cli.main([*args, "--data", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "no usable examples" in err and "line 1" in err and "line 2" in err
    assert cli.main([*args, "--data", str(tmp_path / "missing.jsonl")]) == 1
    assert "not found" in capsys.readouterr().err
    good = tmp_path / "ok.jsonl"
    good.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    assert cli.main([*args, "--data", str(good), "--client-id", "bad/id"]) == 1
    assert "invalid client id" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_smollm2(capsys: pytest.CaptureFixture[str]) -> None:
    out = _profile_json(capsys, "--batch-size", "2", "--max-tokens", "64")
    assert out["model"] == "smollm2-135m" and out["num_layers"] == 36
    assert out["max_trainable_blocks"] >= 1  # type: ignore[operator]
    assert out["block_step_seconds"] > 0  # type: ignore[operator]
    assert out["new_layer_indices"] == [5, 11, 17, 23, 29, 35]
    # 6 blocks of 3,540,096 float32 parameters, 16 bytes each while training
    assert out["block_memory_bytes"] == 16 * 3_540_096
