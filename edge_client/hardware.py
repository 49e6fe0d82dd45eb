"""What hardware is this device? Kind, name, memory, 16-bit support and which quantizations run.

Three paths, tried in this order:

* **Jetson** — ``<proc_root>/device-tree/model`` names an NVIDIA Jetson, or
  ``<root>/etc/nv_tegra_release`` exists, or a devfreq node's ``device/of_node/name`` is a Tegra GPU
  (``gpu``, ``ga10b``, ``gv11b``, ``gp10b``). There is no NVML on a Jetson: memory is unified and
  read from ``<proc_root>/meminfo`` (``MemTotal``, ``MemAvailable``); GPU load (per-mille in
  ``device/load``) and clocks (``cur_freq``, ``max_freq`` in Hz) come from
  ``<root>/sys/class/devfreq/<node>/`` (e.g. ``17000000.ga10b`` on AGX Orin, ``17000000.gpu`` on
  newer L4T). Device-tree strings end in a NUL byte, sysfs values in a newline: both are stripped.
* **Discrete NVIDIA GPU** — NVML (``pynvml`` from nvidia-ml-py) for name, memory, load, clocks.
  NVML missing (``NVMLError_LibraryNotFound``) is the normal case on a CPU machine: DEBUG, not a
  warning. A GPU that NVML sees but this torch build can not use is a warning (profiled as CPU).
* **CPU** — psutil for RAM, ``<proc_root>/cpuinfo`` for the model name and 16-bit instructions.

Which of nf4/int8 run is not guessed: :func:`fedbe.quantization.probe_precision` runs a tiny
quantized layer forward and backward on the device torch will train on.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import torch

from fedbe.quantization import Precision, probe_precision

log = logging.getLogger(__name__)

TEGRA_GPU_NODE_NAMES = ("gpu", "ga10b", "gv11b", "gp10b")
_BF16_TEGRA = ("ga10b",)  # Ampere (Orin) has bf16; Volta (Xavier) and Pascal (TX2) do not


@dataclass(frozen=True)
class GpuActivity:
    """Load and clocks of a GPU right now (None where the device does not say)."""

    load: float | None = None  # fraction 0..1
    cur_freq_hz: int | None = None
    max_freq_hz: int | None = None
    node: str | None = None  # devfreq node (Jetson) or NVML index


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cpu | cuda | jetson
    name: str
    memory_total_bytes: int
    memory_available_bytes: int
    torch_device: str  # where torch will train: "cpu" or "cuda"
    fp16: bool
    bf16: bool
    quantization: dict[str, bool] = field(default_factory=dict)  # nf4/int8 -> runs here
    quantization_errors: dict[str, str] = field(default_factory=dict)
    gpu: GpuActivity | None = None
    details: str = ""  # e.g. the L4T release


def probe_device(
    sysfs_root: str | Path = "/", proc_root: str | Path = "/proc", *, probe_quantization: bool = True
) -> DeviceInfo:
    """Identify this device. ``sysfs_root`` is the root under which ``sys/`` and ``etc/`` are read."""
    root, proc = Path(sysfs_root), Path(proc_root)
    info = _probe_jetson(root, proc) or _probe_nvidia() or _probe_cpu(proc)
    if probe_quantization:
        works, errors = quantization_support(info.torch_device)
        info = replace(info, quantization=works, quantization_errors=errors)
    log.debug("probed device: %s", info)
    return info


def quantization_support(torch_device: str) -> tuple[dict[str, bool], dict[str, str]]:
    """Which of nf4/int8 run forward and backward on ``torch_device``, and why not where they do not."""
    works: dict[str, bool] = {}
    errors: dict[str, str] = {}
    for precision in (Precision.NF4, Precision.INT8):
        reason = probe_precision(precision, torch_device)
        works[precision.value] = reason is None
        if reason is not None:
            errors[precision.value] = reason
            log.info("%s does not run on %s: %s", precision.value, torch_device, reason)
    return works, errors


# --- Jetson --------------------------------------------------------------------------------------


def read_meminfo(path: Path) -> dict[str, int]:
    """``/proc/meminfo`` as bytes per key (values there are in kB = KiB)."""
    values: dict[str, int] = {}
    for line in path.read_text(encoding="ascii", errors="replace").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            values[key.strip()] = int(parts[0]) * scale
    return values


def read_sysfs_text(path: Path) -> str | None:
    """A sysfs/device-tree value without its trailing NUL bytes and whitespace; None if unreadable."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace").strip("\x00 \t\r\n")
    except OSError as exc:
        log.debug("can not read %s: %s", path, exc)
        return None


def _read_int(path: Path) -> int | None:
    text = read_sysfs_text(path)
    try:
        return int(text) if text else None
    except ValueError:
        log.debug("%s holds %r, not a number", path, text)
        return None


def find_tegra_gpu(root: Path) -> tuple[str, GpuActivity] | None:
    """The devfreq node of a Tegra GPU under ``<root>/sys/class/devfreq``: (of_node name, activity)."""
    devfreq = root / "sys" / "class" / "devfreq"
    if not devfreq.is_dir():
        return None
    for node in sorted(devfreq.iterdir()):
        of_name = read_sysfs_text(node / "device" / "of_node" / "name")
        if of_name not in TEGRA_GPU_NODE_NAMES:
            continue
        load = _read_int(node / "device" / "load")
        activity = GpuActivity(
            load=None if load is None else load / 1000.0,
            cur_freq_hz=_read_int(node / "cur_freq"),
            max_freq_hz=_read_int(node / "max_freq"),
            node=node.name,
        )
        return of_name, activity
    return None


def _probe_jetson(root: Path, proc: Path) -> DeviceInfo | None:
    model = read_sysfs_text(proc / "device-tree" / "model")
    release = read_sysfs_text(root / "etc" / "nv_tegra_release")
    gpu = find_tegra_gpu(root)
    is_jetson = bool(model and ("jetson" in model.lower() or "nvidia" in model.lower()))
    if not (is_jetson or release is not None or gpu is not None):
        return None
    meminfo = read_meminfo(proc / "meminfo")
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    cuda = torch.cuda.is_available()
    if not cuda:
        log.warning(
            "this is a Jetson but torch has no CUDA: install NVIDIA's torch wheel for this L4T release "
            "into the virtualenv; profiling on the CPU until then"
        )
    gpu_name, activity = gpu if gpu is not None else (None, None)
    details = f"L4T {_l4t_release(release)}" if release else ""
    return DeviceInfo(
        kind="jetson",
        name=model or (f"NVIDIA Jetson ({gpu_name} GPU)" if gpu_name else "NVIDIA Jetson"),
        memory_total_bytes=total,
        memory_available_bytes=available,
        torch_device="cuda" if cuda else "cpu",
        fp16=True,
        bf16=torch.cuda.is_bf16_supported() if cuda else gpu_name in _BF16_TEGRA,
        gpu=activity,
        details=details,
    )


def _l4t_release(text: str) -> str:
    """``# R35 (release), REVISION: 4.1, ...`` -> ``R35.4.1``."""
    first = text.splitlines()[0] if text else ""
    major = first.lstrip("# ").split(" ")[0]
    _, _, rest = first.partition("REVISION:")
    revision = rest.split(",")[0].strip()
    return f"{major}.{revision}" if major and revision else first.strip()


# --- discrete NVIDIA GPU -------------------------------------------------------------------------


def _probe_nvidia() -> DeviceInfo | None:
    cuda = torch.cuda.is_available()
    nvml = _nvml_query(_torch_pci_bus_id() if cuda else None)
    if nvml is None and not cuda:
        return None
    if not cuda:
        assert nvml is not None
        log.warning(
            "NVML sees %s but this torch build has no CUDA; profiling the CPU. Install a CUDA build of "
            "torch to train on the GPU.",
            nvml[0],
        )
        return None
    index = torch.cuda.current_device()
    if nvml is not None:
        name, total, available, activity = nvml
    else:
        free, total = torch.cuda.mem_get_info(index)
        name, available, activity = torch.cuda.get_device_name(index), free, None
    return DeviceInfo(
        kind="cuda",
        name=name,
        memory_total_bytes=int(total),
        memory_available_bytes=int(available),
        torch_device="cuda",
        fp16=True,
        bf16=bool(torch.cuda.is_bf16_supported()),
        gpu=activity,
    )


def _torch_pci_bus_id() -> str | None:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    domain, bus, dev = (getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id"))
    if domain is None or bus is None or dev is None:
        return None
    return f"{domain:08X}:{bus:02X}:{dev:02X}.0"


def _nvml_query(pci_bus_id: str | None) -> tuple[str, int, int, GpuActivity] | None:
    """(name, total, free, activity) of the GPU torch uses (by PCI bus id, else the first); None: no NVML."""
    try:
        import pynvml  # noqa: PLC0415 - nvidia-ml-py; imported on use
    except ImportError:
        log.debug("nvidia-ml-py is not installed: no NVML")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML not available (%s): no NVIDIA driver here, which is normal on a CPU machine", exc)
        return None
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return None
        handle = None
        if pci_bus_id is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
            except pynvml.NVMLError:
                log.debug("NVML has no GPU at PCI bus id %s; using GPU 0", pci_bus_id)
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        activity = GpuActivity(
            load=pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0,
            cur_freq_hz=pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS) * 10**6,
            max_freq_hz=pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS) * 10**6,
            node=pci_bus_id,
        )
        text = name.decode() if isinstance(name, bytes) else str(name)
        return text, int(memory.total), int(memory.free), activity
    except pynvml.NVMLError as exc:
        log.warning("NVML is present but could not describe the GPU: %s", exc)
        return None
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


# --- CPU -----------------------------------------------------------------------------------------


def cpu_description(proc: Path) -> tuple[str, set[str]]:
    """CPU model name and instruction-set flags from ``cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    try:
        text = (proc / "cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        found.setdefault(key.strip().lower(), value.strip())
    # x86 "model name"; ARM "Model" (the board) or "Hardware"; x86's bare "model" is a number
    names = [found.get(k, "") for k in ("model name", "model", "hardware", "cpu model")]
    name = next((n for n in names if n and not n.isdigit()), "")
    flags = set((found.get("flags") or found.get("features") or "").split())
    return name or platform.processor() or platform.machine() or "unknown CPU", flags


def _probe_cpu(proc: Path) -> DeviceInfo:
    name, flags = cpu_description(proc)
    memory = psutil.virtual_memory()
    return DeviceInfo(
        kind="cpu",
        name=name,
        memory_total_bytes=int(memory.total),
        memory_available_bytes=int(memory.available),
        torch_device="cpu",
        # native 16-bit arithmetic; torch emulates it elsewhere (correct, slower)
        fp16=bool(flags & {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
        bf16=bool(flags & {"avx512_bf16", "amx_bf16", "bf16"}),
        details=f"{psutil.cpu_count(logical=True)} logical cores",
    )
