"""File identity: one content fingerprint for every file reamkit reads or writes.

:func:`file_hash` streams every byte of a file through SHA-256. The result is cached (a small SQLite file in the
cache folder) under the file's device, inode, size, mtime and ctime, so a rerun does not read unchanged files
again, while a file changed in any way (a write or ``touch`` moves its ctime) is hashed again. A copied folder
(``cp -r``: new inodes) is hashed again once and, holding the same bytes, keeps its identity.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

from .cache import cache_root

_CHUNK = 1 << 22


def _stat_key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _db() -> sqlite3.Connection | None:
    try:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(root / "file-hashes.sqlite", timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS hashes (stat TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
        con.execute("CREATE TABLE IF NOT EXISTS facts (sha256 TEXT, fact TEXT, PRIMARY KEY (sha256, fact))")
        return con
    except (OSError, sqlite3.Error):
        return None          # no writable cache: hash every time


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's whole content, cached by its identity on disk."""
    path = Path(path)
    st = path.stat()
    key = _stat_key(st)
    con = _db()
    try:
        if con is not None:
            row = con.execute("SELECT sha256 FROM hashes WHERE stat = ?", (key,)).fetchone()
            if row:
                return row[0]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        if con is not None and _stat_key(path.stat()) == key:     # unchanged while it was read
            try:
                with con:
                    con.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?)", (key, digest))
            except sqlite3.Error:
                pass
        return digest
    finally:
        if con is not None:
            con.close()


def known(digest: str, fact: str) -> bool:
    """Whether ``fact`` (e.g. "finite": every tensor checked) was established for content ``digest`` before."""
    con = _db()
    if con is None:
        return False
    try:
        return con.execute("SELECT 1 FROM facts WHERE sha256 = ? AND fact = ?", (digest, fact)).fetchone() is not None
    finally:
        con.close()


def remember(digest: str, fact: str) -> None:
    con = _db()
    if con is None:
        return
    try:
        with con:
            con.execute("INSERT OR IGNORE INTO facts VALUES (?, ?)", (digest, fact))
    except sqlite3.Error:
        pass
    finally:
        con.close()


def output_hashes(path: Path) -> dict[str, str]:
    """Content hashes of an output: ``{"": hash}`` for a file, ``{relative path: hash}`` for a folder's files."""
    path = Path(path)
    if path.is_file():
        return {"": file_hash(path)}
    return {str(p.relative_to(path)): file_hash(p) for p in sorted(path.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def changed_files(path: Path, recorded: dict[str, str]) -> list[Path]:
    """The files of ``recorded`` (from :func:`output_hashes`) that are missing or hold other bytes now."""
    path = Path(path)
    bad = []
    for rel, digest in recorded.items():
        p = path / rel if rel else path
        if not p.is_file() or file_hash(p) != digest:
            bad.append(p)
    return bad
