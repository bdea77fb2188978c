"""Where models run: a device name (as the --device flags give it) made a torch device."""
import os

import torch

from .errors import UserError


def resolve_device(name):
    """``auto``: CUDA when available (under torchrun, the GPU of the process's local rank), else the CPU; otherwise
    the named device, refused when it is a CUDA device and there is none."""
    if name == "auto":
        return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available")
    return torch.device(name)
