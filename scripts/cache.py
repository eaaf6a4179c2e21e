"""Provenance hashing and atomic writes shared by every cached stage (tiles, features, clusters).

Every cache entry is a directory whose name carries a hash of its inputs. It is written under a temporary
name in the same folder and renamed into place, so a killed run never leaves a torn entry and a rerun
picks up at the first missing one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from scripts.errors import writing

_TMP_PREFIX = ".tmp-"


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (keys sorted), truncated to ``length``."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike, chunk: int = 1 << 22) -> dict[str, Any]:
    """Cheap content fingerprint of a (possibly huge) slide: size + SHA-256 of the first and last 4 MiB."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(size - chunk, chunk))
            h.update(f.read(chunk))
    return {"name": p.name, "size": size, "sha256_head_tail": h.hexdigest()}


def file_sha256(path: str | os.PathLike, length: int = 16, chunk: int = 1 << 20) -> str:
    """sha256 of a whole file's bytes (first ``length`` hex digits), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:length]


def tensor_dict_hash(state: dict[str, Any], length: int = 16) -> str:
    """Hash of a state dict's names, shapes and values (order independent)."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        arr = v.detach().cpu().contiguous().numpy() if hasattr(v, "detach") else np.asarray(v)
        h.update(k.encode())
        h.update(str(arr.shape).encode())
        h.update(str(arr.dtype).encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:length]


@contextmanager
def atomic_dir(final: str | os.PathLike, what: str | None = None, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; rename it to ``final`` only if the block succeeds, so ``final``
    is complete or absent. If ``final`` exists by then, a cache entry (``replace=False``) keeps it (another process
    finished the same entry first); an output (``replace=True``, e.g. a slide folder of a rerun) is replaced whole,
    the old folder moved aside before the rename. A full disk is one :class:`scripts.errors.DiskFullError` naming
    the folder and ``what`` (default: the entry's name)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with writing(final.parent, what or f"'{final.name}'"):
            tmp.mkdir()
            yield tmp
        if final.exists() and not replace:
            shutil.rmtree(tmp)
            return
        old = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with writing(path.parent, f"'{path.name}'"), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Atomically write a ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporaries and claims (``*.lock``) left in ``folder`` by killed processes of this host (their pid
    is gone); return how many. A process killed after its entry was renamed into place but before it released
    its claim leaves a lock that no later run would take over (the entry is complete, nobody claims it again)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for lock in folder.glob("*.lock"):
        if _held_by_dead_process(claim_holder(lock.with_name(lock.name[: -len(".lock")]))):
            lock.unlink(missing_ok=True)
            removed += 1
    for p in folder.glob(f"{_TMP_PREFIX}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue  # still being written
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def _held_by_dead_process(holder: dict | None) -> bool:
    """Whether a claim's holder is a process of this host that no longer runs (its claim is stale)."""
    pid = int(holder.get("pid", 0)) if holder else 0
    return pid > 0 and holder.get("host") == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f"{target.name}.lock"


def try_claim(target: str | os.PathLike) -> bool:
    """Claim the right to compute cache entry ``target`` (a ``<target>.lock`` file created exclusively).

    Returns False when another live process holds the claim. A claim left by a dead process on this host is
    taken over; claims from other hosts (shared filesystems) are respected until released, so a crashed node's
    claims must be cleared with ``rm <store>/*.lock`` (docs/scaling.md).
    """
    lock = _lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    tmp = lock.parent / f"{_TMP_PREFIX}{lock.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(me))
    try:
        for _ in range(2):
            try:
                os.link(tmp, lock)  # atomic: the lock appears complete or not at all
                return True
            except FileExistsError:
                holder = claim_holder(target)
                if holder is None:
                    continue  # released meanwhile
                if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    return True
                if _held_by_dead_process(holder):
                    lock.unlink(missing_ok=True)  # stale: the holder died
                    continue
                return False
        return False
    finally:
        tmp.unlink(missing_ok=True)


def claim_holder(target: str | os.PathLike) -> dict | None:
    """The ``{host, pid, time}`` holding a claim on ``target``, or None (no claim, or a torn lock file)."""
    try:
        return json.loads(_lock_path(target).read_text())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


def release_claim(target: str | os.PathLike) -> None:
    """Release this process's claim on ``target`` (no-op when not held by this process)."""
    holder = claim_holder(target)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        _lock_path(target).unlink(missing_ok=True)
