"""Programmatic dependent launch (sm_90 and later): each decode kernel lets the next one launch early.

XLA (jaxlib >= 0.10, on sm_90+) compiles every Triton kernel, Pallas's included, with `griddepcontrol.wait`
at its entry and launches it with programmatic stream serialization: the kernel may be launched before the
one ahead of it has finished, and waits at its entry until that one has completed and its writes are
visible. When the next kernel is launched is up to the running one: at its `griddepcontrol.launch_dependents`,
or without one when its last program exits. XLA emits that trigger only in its own Triton GEMMs, so each of the
decode step's small dependent kernels (3-8 us apiece) was launched only once the one before it had exited.
Issued as each program starts ("start"), the trigger puts that launch behind the running kernel; issued once a
program's loads are done ("end": after its product, or its walk over the keys), the next kernel's programs
launch while this one's finish their sums and stores, as XLA places the trigger in its GEMMs.

Safe whatever the next kernel reads: its entry wait is for the whole of this grid, not for the trigger. A
kernel launched without programmatic serialization (cuBLAS, Mosaic GPU) waits for completion as ever.

On by default at "end": run 21 of benchmarks/RESULTS.md (`benchmarks/early_launch_gpu.sh`) found "start"
correct (the same outputs, bitwise, and the engine's tokens) but 3-10% slower a decode step, the next kernel's
programs waiting on the multiprocessors while this one's still need them; "end" was as correct and faster in all
six comparisons of runs 23-24 (batch 1 and 8, three pairs of processes, H200 and H100: 0.6-5.7%).
`GPTJAX_EARLY_LAUNCH=start` or `=0` in the environment (or `EARLY_LAUNCH`, or `decode_probe --early-launch
start|end|off`) moves it or turns it off.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

PLACEMENTS = ("start", "end")  # where a program issues the trigger: as it starts, or once its loads are done
DEFAULT = "end"


def placement(value) -> str:
    """"start", "end" or "" (no trigger) from a switch's value: True and "1" mean the default ("end"), False,
    "0" and "off" none."""
    value = {True: DEFAULT, "1": DEFAULT, False: "", None: "", "0": "", "off": ""}.get(value, value)
    if value not in ("", *PLACEMENTS):
        raise ValueError(f"early launch: {value!r} is none of {PLACEMENTS} (or off)")
    return value


def _from_environment() -> tuple[str, str]:
    """`GPTJAX_EARLY_LAUNCH` -> (its placement, ""), or (the default, the error naming it): a bad value must not
    stop every import of gptjax (a `--help` included); `check_environment` raises it at the program's edge."""
    raw = os.environ.get("GPTJAX_EARLY_LAUNCH", DEFAULT)
    try:
        return placement(raw), ""
    except ValueError as e:
        return DEFAULT, f"GPTJAX_EARLY_LAUNCH={raw!r}: {e}"


EARLY_LAUNCH, ENVIRONMENT_ERROR = _from_environment()  # where the decode kernels issue the trigger


def check_environment() -> None:
    """Raise ValueError naming `GPTJAX_EARLY_LAUNCH` if its value is none of the placements."""
    if ENVIRONMENT_ERROR:
        raise ValueError(ENVIRONMENT_ERROR)
MIN_COMPUTE_CAPABILITY = 9.0  # `griddepcontrol` is an sm_90 instruction


def enabled(interpret: bool) -> str:
    """Where the kernels traced now issue the trigger ("" for nowhere): compiled (not interpreted) for a GPU
    that has it, at `EARLY_LAUNCH`."""
    check_environment()
    if interpret or not EARLY_LAUNCH or jax.default_backend() != "gpu":
        return ""
    has_it = float(getattr(jax.devices()[0], "compute_capability", 0) or 0) >= MIN_COMPUTE_CAPABILITY
    return placement(EARLY_LAUNCH) if has_it else ""


def resolve(requested: bool | str | None, interpret: bool) -> str:
    """A kernel's `early_launch` argument -> where it issues the trigger ("" for nowhere): None means
    `enabled`, True `EARLY_LAUNCH` or else the default; never in the interpreter, which cannot run the assembly."""
    if interpret:
        return ""
    if requested is None:
        return enabled(interpret)
    return placement(EARLY_LAUNCH or DEFAULT) if requested is True else placement(requested)


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


def launch_dependents_after(values):
    """The trigger once `values` (a float32 tile) is computed: the tile comes back through the assembly (in
    float registers), so everything after it waits for it and it for the loads before."""
    [same] = plgpu.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[values], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(values.shape, values.dtype)])
    return same
