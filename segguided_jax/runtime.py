"""XLA's CPU settings, applied by the package itself when it is imported (segguided_jax/__init__.py),
before JAX starts its backend: every entry point (train, predict, evaluate, export, sweeps, an
installed wheel, a notebook) runs with them however it was started, and they live only here.

Set only where measured to help (benchmarks/vs_monai.py --xla_flag_sets='default;none'): with
jax >= 0.12 on x86-64, convolutions as oneDNN calls cut the synthetic config's train step 4.5x
(478 against 2130 ms); on jax 0.10.2 the step's CPU time is within noise of the flagless one (1397
against 1464 ms per step), so they are left off there. A user's own XLA_FLAGS that mention oneDNN
win, and SEGGUIDED_CPU_FLAGS chooses: `fast` (default) both flags, `cacheable` without the
custom-call flag, `none` neither.
"""
from __future__ import annotations

import os
import platform
import warnings
from importlib.metadata import PackageNotFoundError, version

ONEDNN = "--xla_cpu_use_onednn=true"
# Programs compiled with this flag cannot be written to JAX's persistent compilation cache (XLA
# fails to serialise the oneDNN custom calls: "std::bad_alloc"), so they compile afresh in every
# process; `cacheable` leaves it out where compilation dominates (the tests' tiny programs).
ONEDNN_CUSTOM_CALL = "--xla_cpu_experimental_onednn_custom_call=true"
CHOICES = {"fast": (ONEDNN, ONEDNN_CUSTOM_CALL), "cacheable": (ONEDNN,), "none": ()}


def cpu_flags(environ=os.environ, machine: str | None = None, jax_version: str | None = None) -> tuple:
    """The XLA flags this package adds on this machine (empty where none help or the user set their own)."""
    choice = environ.get("SEGGUIDED_CPU_FLAGS", "fast")
    if choice not in CHOICES:
        raise ValueError(f"SEGGUIDED_CPU_FLAGS={choice!r}: one of {', '.join(CHOICES)}")
    if "onednn" in environ.get("XLA_FLAGS", ""):
        return ()
    machine = machine or platform.machine()
    if jax_version is None:
        try:
            jax_version = version("jax")
        except PackageNotFoundError:
            return ()
    if machine.lower() not in ("x86_64", "amd64") or tuple(int(v) for v in jax_version.split(".")[:2]) < (0, 12):
        return ()
    return CHOICES[choice]


def apply(environ=os.environ) -> None:
    """Adds cpu_flags() to XLA_FLAGS (read when JAX starts its backend, so before any computation)."""
    flags = cpu_flags(environ)
    if flags:
        environ["XLA_FLAGS"] = " ".join(filter(None, [environ.get("XLA_FLAGS", ""), *flags]))
    # The one message the custom-call flag makes JAX print for every program it cannot cache (see
    # ONEDNN_CUSTOM_CALL): nothing a user can act on, and the program runs all the same.
    warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry .*std::bad_alloc",
                            category=UserWarning)


def original_threefry():
    """The random-bits algorithm every draw of this package is made with, as a context manager:
    the non-partitionable threefry (jax_threefry_partitionable=False), entered where parameters and
    on-device noise are drawn (models.network.build_model, data.device_augment), so that every entry
    point draws the same numbers whatever else the process imported or set. With jax 0.12's
    partitionable default the CPU compiler took ~140 s (instead of ~8 s) to compile the synthetic
    config's parameter init. JAX records the setting in each traced operation, so it holds inside
    jitted functions whatever the caller's own setting."""
    import jax  # not at the top: this module runs before JAX may start (apply)

    return jax.threefry_partitionable(False)
