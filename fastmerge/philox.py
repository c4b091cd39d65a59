"""Counter-based random numbers shared by every backend (Philox4x32-10).

Random ops (DARE drop, DELLA keep decisions) must give the *same* mask for the same seed on
every backend, CPU and GPU, and on every run, so they cannot use torch's stateful generators.
We use Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
the generator behind cuRAND's and Triton's ``tl.rand``, with a fixed *counter layout*:

Counter layout (the contract the ``cpu``, ``triton`` and ``cuda`` kernels reproduce bit for bit)
-----------------------------------------------------------------------------------------------
* key  ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)`` for a 64-bit unsigned ``seed``.
* For the element with flat (row-major, logical) index ``i`` (64-bit) of the tensor of input
  slot ``stream`` (the model's position in the ``models`` list, a 32-bit value; 0 for
  single-tensor ops), the
  counter is ``(c0, c1, c2, c3) = (lo32(i >> 2), hi32(i >> 2), stream, 0)``.
  One Philox call yields four 32-bit words; element ``i`` uses word ``i & 3``.
* Uniform: ``u = float32(word >> 8) * 2**-24`` (exact, in ``[0, 1)``).
* An element is *kept* iff ``u < p`` (an fp32 comparison), ``p`` its keep probability:
  ``density`` for DARE; for DELLA ``p = c1 + rn * c2`` with ``c1 = fp32(density - epsilon)``,
  ``c2 = fp32(2 * epsilon)``, ``rn = fp32(a) / fp32(n - 1)`` (correctly rounded division,
  ``a`` the ascending magnitude rank within the row, 0 when ``n == 1``), each operation rounded
  separately (no fused multiply-add).

Philox4x32-10: ten rounds of
``(c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0, lo(M1*c2), hi(M0*c0) ^ c3 ^ k1, lo(M0*c0))``
with ``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57``; the key is bumped by
``(0x9E3779B9, 0xBB67AE85)`` between rounds.

This module is the readable torch implementation used by the reference backend.
"""
from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
#: 2**-24: turns the top 24 bits of a word into a float in [0, 1) exactly.
UNIFORM_SCALE = 2.0 ** -24


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products wrap modulo 2**64, which keeps both 32-bit halves exact.
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(c0, c1, c2, c3, seed: int, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values; returns four words."""
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(numel: int, seed: int, stream: int = 0, device="cpu") -> torch.Tensor:
    """The 32-bit word (as int64) that the counter layout assigns to each flat index."""
    groups = (numel + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    zero = torch.zeros_like(g)
    words = philox4x32(g & _MASK32, g >> 32, zero + (stream & _MASK32), zero, seed)
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def uniform(numel: int, seed: int, stream: int = 0, device="cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) for flat indices ``0..numel-1`` of input slot ``stream``."""
    return (random_words(numel, seed, stream, device) >> 8).to(torch.float32) * UNIFORM_SCALE


def resolve_seed(seed) -> int:
    """A 64-bit seed; ``None`` draws one from torch's default generator (``torch.manual_seed``)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed
