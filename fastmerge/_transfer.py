"""The one door between host and device memory on the GPU paths (the driver in
``fastmerge/backends/_gpu.py``, the Triton and CUDA kernel sets).

* :func:`to_host` is every device->host read (a stream synchronisation on CUDA). It counts its
  calls in :data:`reads`, so a test can hold a merge to its budget (one read: the non-finite
  flags) without a GPU, in Triton's interpreter.
* :func:`to_device` is every small host->device tensor (thresholds placeholders, indices,
  scales): staged in page-locked memory and copied ``non_blocking``, so it never waits for the
  stream (``torch.tensor(list, device="cuda")`` copies from pageable memory, which does).
"""
from __future__ import annotations

import torch

reads = 0    # device->host reads so far (to_host calls)
uploads = 0  # host->device copies so far (to_device calls)


def to_host(t: torch.Tensor):
    """``t.tolist()``: the values of a (small) device tensor on the host."""
    global reads
    reads += 1
    return t.tolist()


def to_device(values, dtype, device) -> torch.Tensor:
    """A small list of host values as a tensor on ``device``, without a stream sync on CUDA."""
    global uploads
    uploads += 1
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    staged = torch.tensor(values, dtype=dtype).pin_memory()
    # the caching host allocator keeps ``staged`` alive until the copy on the stream completes
    return staged.to(device, non_blocking=True)
