"""Machine facts (embedjob.worker.host): usable CPUs without torch (the decode processes never load
it), device resolution through the one torch import (embedjob.worker.model.torch_env)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedjob.worker.host import available_cpus
from embedjob.worker.model import ModelLoadError
from embedjob.worker.model.torch_env import resolve_device


def test_available_cpus_without_importing_torch():
    code = ("import sys; from embedjob.worker.host import available_cpus; "
            "import embedjob.worker.datapath.decode_pool, embedjob.procs; "
            "print(available_cpus() >= 1, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
    assert 1 <= available_cpus()


def test_device_resolution():
    from embedjob.worker.model.torch_env import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="unsupported device"):
        resolve_device("mps")
