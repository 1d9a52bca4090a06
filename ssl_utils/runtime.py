"""Run-time plumbing shared by every loop: device, CPU model and bf16 support, AMP, seeds, schedules.

Process-group helpers (rank, world size, collectives, shards) are in ``ssl_utils.distributed``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device a process runs on, chosen in one place.

    ``None`` / ``"auto"``: this process's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU;
    ``"cuda"`` without an index: this process's GPU; anything else as given. Asking for CUDA where
    there is none raises ``RuntimeError`` naming the host.
    """
    if isinstance(device, torch.device) and device.type != "cuda":
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        import socket

        raise RuntimeError(f"device {name!r}: CUDA is not available on {socket.gethostname()}")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return dev


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover - platform specific
            pass
    return False


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The one description of the machine every report carries (the study, the demo, the sweeps, the
    benchmarks): CPU model, cores, torch threads, bf16 support, memory, library versions, GPU (if any),
    the precision ``amp="auto"`` picks on ``device`` (default: the best available), load average."""
    import platform

    import monai

    device = select_device(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")(),
        "cpu_bf16": cpu_supports_bf16(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(device),
        "auto_precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype(device, "auto")],
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # pragma: no cover - psutil is a requirement, but the description must not fail
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """``machine_info`` in one line, for a report's header: CPU, cores, bf16, memory, GPU, torch."""
    info = machine_info() if info is None else info
    gpu = f"{info['gpu']} ({info['gpu_memory_gb']} GB)" if info.get("gpu") else "no GPU"
    memory = f", {info['memory_gb']} GB RAM" if "memory_gb" in info else ""
    return (f"{info['cpu']}, {info['logical_cores']} cores (bf16: {'yes' if info['cpu_bf16'] else 'no'}){memory}, "
            f"{gpu}; torch {info['torch']}, MONAI {info['monai']}")


def optimizer_kwargs(device: torch.device | str) -> dict[str, Any]:
    """``{"fused": True}`` where PyTorch has a fused Adam/AdamW kernel (CPU, CUDA): one pass over
    the parameters per step instead of a dozen, and no parameter-sized temporaries."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {}


def amp_dtype(device: torch.device, amp: str | bool = "auto") -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (``None`` = full fp32).

    ``"auto"``: bf16 on GPUs and CPUs that support it, fp16 on older GPUs, fp32 elsewhere.
    """
    if amp in (False, "off", "fp32", None):
        return None
    if amp == "bf16" or amp is True and device.type == "cpu":
        return torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("amp='fp16' needs a CUDA device; use 'bf16' or 'off' on CPU")
        return torch.float16
    # auto
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_supports_bf16():
        return torch.bfloat16
    return None


@dataclass
class Precision:
    """One autocast context for the whole run, and a GradScaler that is active only for fp16.

    Which parts of a model compute in ``dtype`` under this context is the model's side of the
    precision policy: ``ssl_utils.speedups.apply_speedups`` keeps the parts named by the
    ``fp32_parts`` setting in fp32 (by default ViTAutoEnc's first transposed convolution, whose bf16
    input gradient oneDNN computes wrongly on CPUs), for every loop alike."""

    device: torch.device
    dtype: torch.dtype | None

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy, torch (and MONAI's global state); optionally force deterministic kernels."""
    from monai.utils import set_determinism

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    set_determinism(seed=seed % 2**32)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        # set_determinism also switches cudnn to deterministic; undo for speed
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def configure_cpu() -> None:
    """Avoid multi-minute stalls on denormal floats on CPU."""
    try:
        torch.set_flush_denormal(True)
    except Exception:  # pragma: no cover
        pass


def lr_lambda(warmup_steps: int, total_steps: int, cosine: bool):
    """Multiplier for ``LambdaLR``: linear warm-up, then constant or cosine decay to 0."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f
