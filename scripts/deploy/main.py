"""Run the Deploy application with the bundle's error reporting: bad input ends with one line naming the
file and the fix, and a non-zero exit code; SIGINT / SIGTERM end it after the current step (feature batch or
slide) with one line and exit 130 / 143, and the same command resumes from the cached features."""

from __future__ import annotations

import logging
import os
import sys

from scripts.errors import BundleInputError, find_input_error

logger = logging.getLogger(__name__)


def set_cpu_numerics() -> bool:
    """Flush denormal floats to zero in CPU arithmetic unless ``CSMIL_FLUSH_DENORMAL`` is 0 (the bundle's
    ``flush_denormal``, default on: a collapsed transformer head's denormal weights are computed in microcode, up to
    27x slower; no effect on GPUs). Called first, before torch's thread pool and the Holoscan executor start their
    threads, which inherit the setting. Returns the setting."""
    import torch

    from scripts.config_values import as_bool

    value = os.environ.get("CSMIL_FLUSH_DENORMAL") or "1"
    try:
        flush = as_bool(value)
    except ValueError:
        raise BundleInputError("CSMIL_FLUSH_DENORMAL", f"{value!r} is not a switch", "set it to 1 (flush, the default) or 0") from None
    torch.set_flush_denormal(flush)
    return flush


def main(argv: list[str] | None = None) -> int:
    """Build and run :class:`scripts.deploy.app.CSMILDeployApp`; returns the process exit code."""
    from scripts.deploy.app import CSMILDeployApp, preflight
    from scripts.interrupts import exit_code, install_interrupt_handlers, interrupted_line, stop_signal, watch_for_stop

    try:
        set_cpu_numerics()
        install_interrupt_handlers()
        preflight(argv)
        with watch_for_stop():  # SIGINT / SIGTERM (docker stop) end the app after the current step, exit 130 / 143
            CSMILDeployApp(argv).run() if argv else CSMILDeployApp().run()
        signum = stop_signal()
        if signum is not None:
            print(interrupted_line(signum), file=sys.stderr)
            return exit_code(signum)
    except Exception as exc:  # noqa: BLE001 - input errors become one line, the rest keep their traceback
        found = find_input_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1
    return 0
