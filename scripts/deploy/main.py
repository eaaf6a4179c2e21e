"""Run the Deploy application with the bundle's error reporting: bad input ends with one line naming the
file and the fix, and a non-zero exit code."""

from __future__ import annotations

import logging
import sys

from scripts.errors import find_input_error

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Build and run :class:`scripts.deploy.app.CSMILDeployApp`; returns the process exit code."""
    from scripts.deploy.app import CSMILDeployApp, preflight

    try:
        preflight(argv)
        CSMILDeployApp(argv).run() if argv else CSMILDeployApp().run()
    except Exception as exc:  # noqa: BLE001 - input errors become one line, the rest keep their traceback
        found = find_input_error(exc)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        return 1
    return 0
