"""Write ``constraints.txt``: the exact versions, in this environment, of every package the requirement files pull in.

Why: the requirement files pin torch and MONAI and leave the rest open, so a fresh install can move the protocol's
numbers by a few hundredths (docs/evaluation.md, "The same command in a fresh install"). The constraints file records
the environment the documented numbers were measured in; installing with ``-c constraints.txt`` reproduces it::

    pip install torch==2.13.0 -c constraints.txt && pip install -r requirements-dev.txt -c constraints.txt

pip has no command that lists the installed closure of a set of requirement files, so this walks the installed
distributions' ``Requires-Dist`` (environment markers evaluated here, extras followed) from the names in the files.

    python tools/lock_constraints.py            # rewrite constraints.txt from this environment
    python tools/lock_constraints.py --check    # exit 1 when constraints.txt differs from this environment
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
#: requirement files whose closure is pinned (requirements-optional.txt is left open: GPU and reader extras)
FILES = ("requirements.txt", "requirements-dev.txt")
#: the packages the install commands install first, outside the files
FIRST = ("torch",)


def requirement_lines(path: Path) -> list[Requirement]:
    """Requirements of a pip requirement file, following ``-r`` includes (comments and options dropped)."""
    out: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r"):
            out += requirement_lines(path.parent / line[2:].strip())
        elif not line.startswith("-"):
            out.append(Requirement(line))
    return out


def closure(roots: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` of ``roots`` and everything they require here (markers evaluated for
    this interpreter and platform, extras followed); a requirement that is not installed is skipped."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    done_extras: dict[str, set] = {}
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue
        if name in seen and extras <= done_extras.get(name, set()):
            continue
        seen[name] = dist.version
        done_extras.setdefault(name, set()).update(extras)
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is not None and not any(sub.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            todo.append((sub, frozenset(sub.extras)))
    return seen


def render(pins: dict[str, str]) -> str:
    """The constraints file's text: a header, then ``name==version`` sorted by name (torch's local label, e.g.
    ``+cpu``, dropped so the pin also admits the CUDA builds of the same version)."""
    pinned = {n: re.sub(r"[+].*$", "", v) for n, v in sorted(pins.items())}
    head = ("# The environment the documented numbers were measured in (tools/lock_constraints.py; python "
            f"{sys.version_info.major}.{sys.version_info.minor}, {sys.platform}).\n"
            f"# Reproduce it: pip install torch=={pinned.get('torch', '')} -c constraints.txt && "
            "pip install -r requirements-dev.txt -c constraints.txt\n")
    return head + "".join(f"{n}=={v}\n" for n, v in pinned.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with constraints.txt instead of writing it")
    args = ap.parse_args(argv)
    roots = [Requirement(n) for n in FIRST] + [r for f in FILES for r in requirement_lines(ROOT / f)]
    text = render(closure(roots))
    target = ROOT / "constraints.txt"
    if args.check:
        old = target.read_text() if target.is_file() else ""
        same = [x for x in old.splitlines() if not x.startswith("#")] == [x for x in text.splitlines() if not x.startswith("#")]
        print("constraints.txt matches this environment" if same else "constraints.txt differs from this environment")
        return 0 if same else 1
    tmp = target.with_suffix(".txt.tmp")
    tmp.write_text(text)
    tmp.replace(target)
    print(f"wrote {target} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
