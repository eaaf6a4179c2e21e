"""constraints.txt (tools/lock_constraints.py): the pinned environment of the documented numbers must be installable
with the requirement files, i.e. pin every package they name to a version their specifiers admit."""

from __future__ import annotations

import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import lock_constraints  # noqa: E402


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = Version(version)
    return out


def test_constraints_pin_every_requirement_within_its_specifier():
    pinned = pins()
    reqs = [r for f in lock_constraints.FILES for r in lock_constraints.requirement_lines(ROOT / f)]
    assert len(reqs) >= 25  # the runtime, deploy, encoder and test requirements, -r includes followed
    for r in reqs:
        name = canonicalize_name(r.name)
        assert name in pinned, f"{r.name} is not pinned in constraints.txt: run python tools/lock_constraints.py"
        assert r.specifier.contains(pinned[name], prereleases=True), (str(r), pinned[name])
    readme = (ROOT / "README.md").read_text()
    assert f"pip install torch=={pinned['torch']}" in readme  # the torch the README installs is the pinned one
    assert pinned["monai"] == Version("1.6.1")


def test_render_drops_local_labels_and_sorts(tmp_path):
    text = lock_constraints.render({"torch": "2.13.0+cpu", "abc": "1.0"})
    body = [x for x in text.splitlines() if not x.startswith("#")]
    assert body == ["abc==1.0", "torch==2.13.0"]
    assert Requirement("torch==2.13.0").specifier.contains("2.13.0+cu128")  # a CUDA build satisfies the pin


def test_requirement_files_are_read_with_their_includes(tmp_path):
    (tmp_path / "base.txt").write_text("numpy>=1.26  # comment\n\n--extra-index-url https://example.org\n")
    (tmp_path / "top.txt").write_text("-r base.txt\npytest>=8.0\n")
    got = [str(r) for r in lock_constraints.requirement_lines(tmp_path / "top.txt")]
    assert got == ["numpy>=1.26", "pytest>=8.0"]


def test_closure_follows_requirements_and_skips_what_is_missing():
    got = lock_constraints.closure([Requirement("scikit-learn"), Requirement("not-a-package-here")])
    assert {"scikit-learn", "numpy", "scipy", "joblib", "threadpoolctl"} <= set(got)
    assert "not-a-package-here" not in got
