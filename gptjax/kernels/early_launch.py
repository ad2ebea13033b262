"""Programmatic dependent launch (sm_90 and later): each decode kernel lets the next one launch as it starts.

XLA (jaxlib >= 0.10, on sm_90+) compiles every Triton kernel, Pallas's included, with `griddepcontrol.wait`
at its entry and launches it with programmatic stream serialization: the kernel may be launched before the
one ahead of it has finished, and waits at its entry until that one has completed and its writes are
visible. When the next kernel is launched is up to the running one: at its `griddepcontrol.launch_dependents`,
or without one when its last program exits. XLA emits that trigger only in its own Triton GEMMs, so each of the
decode step's small dependent kernels (3-8 us apiece) was launched only once the one before it had exited.
Issued as each program starts, the trigger puts that launch behind the running kernel.

Safe whatever the next kernel reads: its entry wait is for the whole of this grid, not for the trigger. A
kernel launched without programmatic serialization (cuBLAS, Mosaic GPU) waits for completion as ever.

Off by default: run 21 of benchmarks/RESULTS.md (`benchmarks/early_launch_gpu.sh`) found it correct (the same
outputs, bitwise, and the engine's tokens) but 3-10% slower a decode step, the next kernel's programs waiting on
the multiprocessors while this one's still need them. `GPTJAX_EARLY_LAUNCH=1` in the environment,
`EARLY_LAUNCH = True`, or `decode_probe --early-launch` turns it on.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

EARLY_LAUNCH = os.environ.get("GPTJAX_EARLY_LAUNCH") == "1"  # the decode kernels issue the trigger where they can
MIN_COMPUTE_CAPABILITY = 9.0  # `griddepcontrol` is an sm_90 instruction


def enabled(interpret: bool) -> bool:
    """Whether the kernels traced now issue the trigger: compiled (not interpreted) for a GPU that has it."""
    if interpret or not EARLY_LAUNCH or jax.default_backend() != "gpu":
        return False
    return float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= MIN_COMPUTE_CAPABILITY


def resolve(requested: bool | None, interpret: bool) -> bool:
    """A kernel's `early_launch` argument -> whether it issues the trigger: None means `enabled`; never in the
    interpreter, which cannot run the assembly."""
    return (enabled(interpret) if requested is None else requested) and not interpret


def launch_dependents(program_id):
    """The trigger, inside a Pallas Triton kernel: returns `program_id` (an int32 scalar) through the same
    inline assembly, so that the trigger runs before everything the program computes from it (Pallas's
    inline assembly is pure: a result nothing uses would be dropped). The assembly takes a one-element
    vector: Pallas's lowering gives a scalar's result the type of a 0-d tensor, which its scalar ops refuse."""
    [same] = plgpu.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
        args=[jnp.full((1,), program_id, jnp.int32)], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)])
    return jnp.max(same)
