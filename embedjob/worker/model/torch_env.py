"""The one place torch is imported from: every worker module takes ``torch`` from here, so the
OpenMP policy below is set before torch (and its libgomp) is loaded, whatever imports it first.

The decode processes keep every core busy while this process runs the model. With OpenMP's default
(spin-waiting) torch's threads then burn those cores between ops, and every op's barrier waits for
a peer thread the scheduler gave to a decoder: on 2 cores at 1 MP that cost a third of the
throughput (see README, Performance). Passive threads sleep instead. libgomp reads this once, when
torch is imported, so it is set here, before the import; a setting of the user's own wins.
"""

from __future__ import annotations

from embedjob.settings import library_env, set_library_env
from embedjob.worker.host import available_cpus
from embedjob.worker.model import ModelLoadError

set_library_env("OMP_WAIT_POLICY", "PASSIVE", keep_users=True)
# transformers 5 can fetch "hub kernels" (code) from the Hugging Face hub; a worker runs no code it was
# not installed with, whatever a model asks for (from_pretrained also gets use_kernels=False).
set_library_env("USE_HUB_KERNELS", "0")
import torch  # noqa: E402

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch >= 2.5 names it torch.OutOfMemoryError; torch.cuda.OutOfMemoryError is the same class.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

_threads_configured = False


def configure_cpu_threads() -> None:
    """Use the CPUs we really have, unless the operator pinned OMP_NUM_THREADS (once per process)."""
    global _threads_configured
    if _threads_configured:
        return
    _threads_configured = True
    if not library_env("OMP_NUM_THREADS"):
        torch.set_num_threads(available_cpus())


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when torch sees a GPU, else the CPU; cpu / cuda[:N]: as asked, if this machine has
    it. Raises :class:`~embedjob.worker.model.ModelLoadError`."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"unsupported device {device!r} (use auto, cpu or cuda)")
    return dev


__all__ = ["PRECISION_DTYPES", "OutOfMemoryError", "configure_cpu_threads", "resolve_device", "torch"]
