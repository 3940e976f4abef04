"""The conversion cache: what hybridrt derives from a model file once per machine (the default model's safetensors
copy, a GGUF file's tokenizer files), under the user cache dir, keyed by the source's content.

- The key is the source's size, a hash of its first MiB (a GGUF's header, a safetensors' index) and of a few
  blocks sampled across it, and the converter's version: a copy of the file, a new virtualenv or a new mtime
  finds the same entry; an edited file or a new converter makes a new one. Never the path or the mtime.
- An entry is a folder built under a temporary name and renamed into place; its manifest (written last) lists
  every file with its size and a hash of sampled blocks, checked at every use. A folder that fails the check
  (truncated, edited, half-deleted) is removed and rebuilt, never served.
- Two processes converting the same source take a lock per entry: the second waits and uses the first's.
- The cache is capped (`HYBRIDRT_CACHE_MAX_GB`, default 20): after a build, the least recently used entries go
  first (use = the manifest's mtime, touched at each hit); folders of older hybridrt versions (no manifest) and
  builds left by a crashed process go too.
- A cache dir that can't be written is a one-line warning: the caller converts into a private temporary folder
  (or reads the source directly) and nothing fails.
- Triton's kernel cache lives in the same dir (`use_for_triton`), so kernels compile once per machine too.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CONVERTER_VERSION = 2  # bump when a conversion writes different files for the same source (2: the default model's
# safetensors copy in the fused slots' order, mapped_weights.save_fused_order)
MANIFEST = "hybridrt-entry.json"
HEADER_BYTES = 1 << 20
SAMPLE_BYTES = 1 << 16
SAMPLES = 8
DEFAULT_MAX_GB = 20.0
LOCK_TIMEOUT_S = 1800.0  # a 7B conversion on a slow disk; past it, give up on the cache and convert privately
BUILDING = ".building-"
STALE_BUILD_S = 3600.0  # a temporary build folder this old belongs to a process that died


def cache_root() -> Path:
    """$HYBRIDRT_CACHE_DIR, else $XDG_CACHE_HOME/hybridrt, else ~/.cache/hybridrt."""
    if os.environ.get("HYBRIDRT_CACHE_DIR"):
        return Path(os.environ["HYBRIDRT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybridrt"


def models_dir() -> Path:
    return cache_root() / "models"


def max_bytes() -> int:
    value = os.environ.get("HYBRIDRT_CACHE_MAX_GB", "")
    try:
        gb = float(value) if value else DEFAULT_MAX_GB
    except ValueError:
        raise ValueError(f"HYBRIDRT_CACHE_MAX_GB must be a number of GB, got {value!r}") from None
    return int(gb * (1 << 30))


def _sampled_hash(path: Path, extra: bytes = b"") -> str:
    """sha256 over the size, the first MiB and SAMPLES blocks spread over the file (cheap for any size)."""
    size = path.stat().st_size
    h = hashlib.sha256(extra + size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        h.update(f.read(HEADER_BYTES))
        if size > HEADER_BYTES:
            for i in range(1, SAMPLES + 1):
                f.seek(max(HEADER_BYTES, size * i // (SAMPLES + 1) - SAMPLE_BYTES // 2))
                h.update(f.read(SAMPLE_BYTES))
            f.seek(max(HEADER_BYTES, size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def content_key(source: Path, kind: str) -> str:
    """The cache key of converting `source` into `kind` (e.g. "tokenizer"): content and converter, not path."""
    return _sampled_hash(source, f"{kind}:{CONVERTER_VERSION}:".encode())[:24]


@dataclass(frozen=True)
class Entry:
    folder: Path
    source: str  # the file it was converted from, when it was built (informational)
    bytes: int
    last_used: float  # seconds since the epoch
    status: str  # "ok", "corrupt" (fails its manifest), "legacy" (an older hybridrt's or converter's) or "building"


def _read_manifest(folder: Path) -> dict | None:
    """An entry's manifest as written, whichever converter version wrote it; None when missing or unreadable."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _current(written: dict | None) -> dict | None:
    """A manifest as written, if this converter version wrote it; None otherwise."""
    return written if written is not None and written.get("version") == CONVERTER_VERSION else None


def _manifest(folder: Path) -> dict | None:
    """The manifest of an entry this converter version wrote; None otherwise."""
    return _current(_read_manifest(folder))


def check_entry(folder: Path) -> bool:
    """Whether every file the manifest lists is there with its size and sampled hash."""
    data = _manifest(folder)
    if data is None or not isinstance(data.get("files"), dict):
        return False
    try:
        return all((folder / name).stat().st_size == size and _sampled_hash(folder / name) == digest
                   for name, (size, digest) in data["files"].items())
    except (OSError, TypeError, ValueError):
        return False


def _write_manifest(folder: Path, source: Path) -> None:
    files = {p.name: [p.stat().st_size, _sampled_hash(p)] for p in sorted(folder.iterdir()) if p.is_file()}
    data = {"version": CONVERTER_VERSION, "source": str(source), "created": time.time(), "files": files}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _private_build(name: str, source: Path, build: Callable[[Path], None]) -> Path:
    """Convert into a temporary folder of this process (removed at exit): the cache could not be used."""
    folder = Path(tempfile.mkdtemp(prefix=f"hybridrt-{name}-"))
    atexit.register(shutil.rmtree, folder, True)
    build(folder)
    return folder


def entry_folder(name: str, kind: str, source: Path) -> Path:
    """Where the entry of `source` converted into `kind` lives (whether or not it exists yet)."""
    return models_dir() / f"{name}-{kind}-{content_key(source, kind)}"


def lookup(name: str, kind: str, source: Path) -> Path | None:
    """The intact entry of `source` converted into `kind`, or None; never builds, never waits for a lock."""
    try:
        folder = entry_folder(name, kind, source)
    except OSError:
        return None
    return folder if check_entry(folder) else None


def converted(name: str, kind: str, source: Path, build: Callable[[Path], None],
              private_fallback: bool = True) -> tuple[Path | None, bool]:
    """(folder, built now) of `source` converted by `build(folder)` (which writes the files into an empty folder),
    from the cache when an intact entry exists. `name` labels the entry (`hybridrt cache ls`). When the cache dir
    can't be written: a one-line warning, then a private conversion (or (None, False) without
    `private_fallback`: the caller reads the source itself)."""
    folder = entry_folder(name, kind, source)
    root = folder.parent
    if check_entry(folder):  # the common case, without the lock
        _touch(folder)
        return folder, False
    from filelock import FileLock, Timeout  # here: a hit needs no lock, and `serve` imports this before its spawn

    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / f".{folder.name}.lock"), timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except (OSError, Timeout) as e:
        _warn(f"the cache dir {root} is not usable ({type(e).__name__}: {e}); converting {source.name} without it")
        return (_private_build(name, source, build), True) if private_fallback else (None, False)
    try:
        if check_entry(folder):  # another process built it while we waited
            _touch(folder)
            return folder, False
        if folder.exists():
            _warn(f"the cache entry {folder.name} is damaged; rebuilding it")
            shutil.rmtree(folder, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=BUILDING, dir=root))
        try:
            build(tmp)
            _write_manifest(tmp, source)
            tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # e.g. the disk filled up mid-build
        _warn(f"could not write the cache entry {folder.name} ({type(e).__name__}: {e}); converting without it")
        return (_private_build(name, source, build), True) if private_fallback else (None, False)
    finally:
        lock.release()
    evict(keep=folder)
    return folder, True


def _touch(folder: Path) -> None:
    try:
        os.utime(folder / MANIFEST)
    except OSError:
        pass  # a read-only cache still serves its entries


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def entries() -> list[Entry]:
    """Every folder under the cache's models dir, most recently used first."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        try:
            if folder.name.startswith(BUILDING):
                found.append(Entry(folder, "", _folder_bytes(folder), folder.stat().st_mtime, "building"))
                continue
            written = _read_manifest(folder)
            data = _current(written)
            version = (written or {}).get("version")
            # legacy: no manifest (hybridrt before the manifests), or an older converter's entry, which this
            # version never looks up again (its key holds the converter's version)
            legacy = data is None and (not (folder / MANIFEST).exists()
                                       or (version if isinstance(version, int) else CONVERTER_VERSION)
                                       < CONVERTER_VERSION)
            status = "legacy" if legacy else "ok" if check_entry(folder) else "corrupt"
            used = (folder / MANIFEST).stat().st_mtime if data is not None else folder.stat().st_mtime
            found.append(Entry(folder, (data or {}).get("source", ""), _folder_bytes(folder), used, status))
        except OSError:
            continue  # removed meanwhile
    return sorted(found, key=lambda e: -e.last_used)


def remove(entry: Entry) -> None:
    shutil.rmtree(entry.folder, ignore_errors=True)


def evict(keep: Path | None = None, limit: int | None = None) -> list[Entry]:
    """Remove what does not belong (older hybridrt versions' folders, abandoned builds), then the least recently
    used entries until the cache is within `limit` bytes (default: `max_bytes()`); `keep` stays. The removed."""
    limit = max_bytes() if limit is None else limit
    removed = []
    kept = []
    now = time.time()
    for e in entries():
        if e.folder == keep:
            kept.append(e)
        elif e.status == "legacy" or e.status == "building" and now - e.last_used > STALE_BUILD_S:
            remove(e)
            removed.append(e)
        elif e.status != "building":
            kept.append(e)
    total = sum(e.bytes for e in kept)
    for e in sorted(kept, key=lambda e: e.last_used):  # oldest use first
        if total <= limit:
            break
        if e.folder == keep:
            continue
        remove(e)
        removed.append(e)
        total -= e.bytes
    return removed


def use_for_triton() -> None:
    """Point Triton's kernel cache into this cache dir (unless the user chose one), before Triton compiles anything:
    each kernel then compiles once per machine, like the conversions."""
    if "TRITON_CACHE_DIR" in os.environ:
        return
    path = cache_root() / "triton"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # Triton's own default then; the conversion cache warns about the dir once
    os.environ["TRITON_CACHE_DIR"] = str(path)


def triton_bytes() -> int:
    """Bytes of the Triton kernel cache kept in this dir (0 if none)."""
    path = cache_root() / "triton"
    return _folder_bytes(path) if path.is_dir() else 0


def remove_triton() -> int:
    """Remove the Triton kernel cache kept in this dir; the bytes it held."""
    path = cache_root() / "triton"
    if not path.is_dir():
        return 0
    size = _folder_bytes(path)
    shutil.rmtree(path, ignore_errors=True)
    return size
