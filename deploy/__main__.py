"""Entry point of the CS-MIL MONAI Deploy application (``python deploy -i ... -o ... -m ...``; in a MAP,
``python3 /opt/holoscan/app``). See docs/deploy.md."""

import sys
from pathlib import Path

here = Path(__file__).resolve().parent
# In a MAP the bundle's ``scripts`` package is copied beside this file (``--add scripts``); from a clone it
# is one folder up.
sys.path.insert(0, str(here if (here / "scripts").is_dir() else here.parent))

from scripts.deploy.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
