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
