"""Host reads per merge on the ``triton`` backend, counted in Triton's interpreter: every
device->host transfer of the GPU paths goes through ``fastmerge._transfer.to_host`` (each one a
stream synchronisation on a GPU), and a TIES or DARE-TIES merge makes at most one (the
non-finite flags, read together with the selection's missed-bracket flag). The results are
checked against the torch reference, so a merge that skipped a needed pass would fail."""
from __future__ import annotations

import pytest
import torch

from conftest import reads_of

import fastmerge

pytestmark = pytest.mark.skipif(
    not fastmerge.backends()["triton"].get("interpreter"),
    reason="needs Triton's interpreter (TRITON_INTERPRET=1, set by conftest without CUDA)")


@pytest.mark.parametrize("method,n", [("ties", 3000), ("ties", (1 << 16) + 4096),
                                      ("dare_ties", 3000)])
def test_one_host_read_per_merge(method, n):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(n, generator=g)
    ms = [base + 0.1 * torch.randn(n, generator=g) for _ in range(3)]
    kw = dict(density=0.3, seed=5) if method == "dare_ties" else dict(density=0.3)
    out, reads = reads_of(lambda: fastmerge.merge(method, base, ms, backend="triton", **kw))
    ref = fastmerge.merge(method, base, ms, backend="torch", **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert reads <= 1, f"{method}: {reads} host reads per merge (budget 1)"


def test_missed_bracket_redone_exactly():
    """A run of equal magnitudes overflows the bracket's bin: the merge is redone with the
    exact selection (more reads allowed on that rare path) and still matches the reference."""
    g = torch.Generator().manual_seed(4)
    n = (1 << 16) + 4096
    base = torch.zeros(n)
    ms = [torch.randn(n, generator=g) for _ in range(2)]
    ms[0][: n * 3 // 4] = 0.5  # the top 30% sits inside a run of ties
    out, reads = reads_of(lambda: fastmerge.ties(base, ms, density=0.3, backend="triton"))
    ref = fastmerge.ties(base, ms, density=0.3, backend="torch")
    assert torch.equal(out, ref)
    assert reads >= 2  # the missed-bracket flag was read, then the exact selection ran
