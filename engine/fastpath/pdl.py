"""Programmatic dependent launch (PDL) for the Triton kernels of a step, on Hopper and later.

A decode step of an 8B model is a few hundred short kernels; between two kernels of one
stream the GPU normally drains the first completely and only then starts the second, and
at these kernel lengths that boundary is a noticeable share of the step. With PDL the
next kernel is launched while the previous one is still finishing: every kernel here calls
`enter(USE_PDL)` first, which waits until the previous kernel's writes are visible
(`griddepcontrol.wait`) and then lets the kernel after it launch early
(`griddepcontrol.launch_dependents`). Waiting before reading anything keeps every kernel
exactly as ordered as without PDL; a kernel launched without the attribute, or after a
kernel that never triggers (cuBLAS, torch), just waits for it to finish. CUDA graphs keep
the dependency as a programmatic edge.

`launch_kwargs(pdl)` gives a launch's `USE_PDL` and `launch_pdl` arguments. Whether PDL is
on is the engine's (`KernelConfig.pdl`, resolved per device by `KernelConfig.for_device`:
compute capability 9.0 or more); every kernel wrapper takes it as its `pdl` argument.
"""

from __future__ import annotations

import triton
import triton.language as tl


def launch_kwargs(pdl: bool) -> dict:
    return {"USE_PDL": pdl, "launch_pdl": pdl}


@triton.jit
def enter(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
