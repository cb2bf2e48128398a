"""Programmatic dependent launch (Hopper and later) for the Triton kernels that opt in.

A kernel launched with PDL may be scheduled while the kernel before it still runs, once every program
of that one has signalled (`gdc_launch_dependents`); it must wait (`gdc_wait`) before reading anything
an earlier kernel writes, and may read what none writes (its weights) before. Kernels launched without
PDL are not affected: they start when the kernel before them has finished, as always."""
from __future__ import annotations

import os

import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"   # fixed when Triton is first imported
# griddepcontrol on the device; Triton's interpreter has none: there a PDL kernel only reads its first
# weight tile apart (the tests check that arithmetic)
GRID_DEPENDENCY = tl.constexpr(not INTERPRETED)


def pdl_launch(pdl: bool) -> dict:
    """Launch options of a kernel with a PDL switch (its PDL constexpr; launched with PDL on a GPU)."""
    if not pdl:
        return {}
    return {"PDL": True} if INTERPRETED else {"PDL": True, "launch_pdl": True}
