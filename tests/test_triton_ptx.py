"""The streaming Triton kernels issue vector global loads and stores (PTX for sm_90, compiled
without a GPU by ``tests/triton_ptx_check.py`` in a subprocess: it patches Triton's JIT).

``do_not_specialize=["n"]`` made every ``i < n`` mask non-constant, so each thread read its
elements one ``ld.global.b16`` at a time; with ``n`` specialised (divisible by 16) and tiles of
8 consecutive bf16 per thread, a thread reads 16 bytes per access (``ld.global.v4.b32``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_streaming_kernels_use_vector_accesses():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_ptx_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip() or proc.stderr.strip())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(proc.stdout.splitlines()[0])
    merge = report["_fused_merge_kernel"][0]
    # bf16 K=4 TIES: 5 streams (base + 4 inputs) of 8 bf16 per thread, one 16-byte load each
    assert merge["ld"].get("ld.global.v4.b32") == 5, merge
    assert "ld.global.b16" not in merge["ld"] and "st.global.b16" not in merge["st"], merge
