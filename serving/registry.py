"""The adapter registry: servable LoRA adapters stored as immutable versions ``<root>/<name>/v<N>/``.

Writers (add, remove, metadata updates) hold an exclusive ``fcntl`` lock on ``<root>/.lock``, so
threads and processes get distinct versions. An entry appears by one atomic rename of a
complete directory and disappears by one rename out of the tree, so readers need no lock and
never see half an entry. Version numbers are never reused, even after removal: servers cache
adapters by id, and a reused ``name@vN`` would serve stale weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from serving import servability
from serving.base_models import stillhouse_home
from serving.errors import AdapterNotFoundError, AdapterNotServableError, ValidationError
from serving.servability import Violation

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ADAPTER_ID = re.compile(rf"(?P<name>{_NAME.pattern})(?:@v(?P<version>[1-9][0-9]*))?")
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
_ID_FORM = (
    "use NAME or NAME@vN (N = 1, 2, ...), where NAME is 1-64 letters, digits, '.', '_' or '-', "
    "starts with a letter or digit and contains no '..'"
)
# Copied next to the weights when present; everything else in the source directory stays behind.
_OPTIONAL_FILES = (
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
METADATA_FILE = "metadata.json"
# Facts about the stored weights, fixed when the version is added.
_FIXED_FIELDS = frozenset(
    {
        "base_model", "base_path", "rank", "alpha", "target_modules", "use_rslora",
        "profile", "created", "source_path", "sha256",
    }  # fmt: skip
)
_LAST_VERSION_FILE = ".last_version"


def default_registry_dir() -> Path:
    """``<Stillhouse home>/registry`` ($STILLHOUSE_HOME, else ~/.cache/stillhouse)."""
    return stillhouse_home() / "registry"


@dataclass(frozen=True)
class AdapterEntry:
    """One stored adapter version: its directory holds adapter_config.json and adapter_model.safetensors."""

    name: str
    version: int
    path: Path
    metadata: dict

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"


class NotServableError(AdapterNotServableError):
    """``add`` refused an adapter; ``violations`` holds every reason."""

    def __init__(self, source: Path, profile: str, violations: list[Violation]):
        causes = [violation for violation in violations if not violation.folded]
        fields = ", ".join(dict.fromkeys(violation.field for violation in causes))
        super().__init__(f"{source} is not servable under the {profile} profile: {len(causes)} violation(s) ({fields})")
        self.violations = violations


class Registry:
    """Versioned adapters under ``root``; ids are ``name`` (latest version) or ``name@vN``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def add(
        self, src: Path, name: str, *, base_dir: Path, profile: str = "strict", metadata: dict | None = None
    ) -> AdapterEntry:
        """Check ``src`` against ``base_dir``, then store it as the next version of ``name``.

        Raises NotServableError with every violation (and writes nothing) if it is not servable.
        """
        src = Path(src)
        _validate_name(name)
        extra = dict(metadata or {})
        _refuse_fixed_fields(extra)
        files, violations = _source_files(src)
        violations += servability.check_adapter(src, base_dir, profile=profile)
        if violations:
            raise NotServableError(src, profile, violations)
        summary = servability.summarize_adapter(src)
        record = {
            "base_model": servability.base_names(base_dir)[0],
            "base_path": str(Path(base_dir).resolve()),
            "rank": summary.rank,
            "alpha": summary.alpha,
            "target_modules": list(summary.target_modules),
            "use_rslora": summary.use_rslora,
            "profile": profile,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source_path": str(src.resolve()),
            "metrics": {},
            "lineage": {},
        }
        _merge(record, extra)
        (self.root / ".tmp").mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=self.root / ".tmp"))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the entry from a server running as another user
        try:
            for file_name, path in files.items():
                shutil.copyfile(path, staging / file_name)
            # Hash the copy, not the source: the digest describes exactly what is served.
            record["sha256"] = _sha256(staging / servability.WEIGHTS_FILE)
            _write_json(staging / METADATA_FILE, record)
            with self._locked():
                name_dir = self._inside(self.root / name)
                name_dir.mkdir(exist_ok=True)
                version = self._last_version(name_dir) + 1
                target = name_dir / f"v{version}"
                os.rename(staging, target)
                _write_atomic(name_dir / _LAST_VERSION_FILE, str(version))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return AdapterEntry(name, version, target, record)

    def resolve(self, adapter_id: str) -> AdapterEntry:
        """The entry for ``name`` (its latest version) or ``name@vN``; AdapterNotFoundError if none."""
        name, version = _parse_id(adapter_id)
        versions = self._versions(name)
        if not versions:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the registry; {self._inventory()}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            known = ", ".join(f"{name}@v{v}" for v in versions)
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the registry; {name} has {known}")
        return self._entry(name, version)

    def list(self) -> list[AdapterEntry]:
        """Every stored version, sorted by name then version."""
        return [self._entry(name, version) for name in self._names() for version in self._versions(name)]

    def remove(self, adapter_id: str) -> list[AdapterEntry]:
        """Remove ``name@vN``, or every version of ``name``; returns what was removed."""
        name, version = _parse_id(adapter_id)
        with self._locked():
            if version is not None:
                entries = [self.resolve(adapter_id)]
            else:
                entries = [self._entry(name, v) for v in self._versions(name)]
            if not entries:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not in the registry; {self._inventory()}")
            (self.root / ".tmp").mkdir(exist_ok=True)
            for entry in entries:
                # Rename out of the tree first so readers never see a half-deleted version.
                doomed = Path(tempfile.mkdtemp(prefix="removed.", dir=self.root / ".tmp"))
                os.rename(entry.path, doomed / entry.path.name)
                shutil.rmtree(doomed)
        return entries

    def update_metadata(self, adapter_id: str, **fields) -> AdapterEntry:
        """Merge ``fields`` into a version's metadata (dicts such as metrics and lineage merge key by key)."""
        _refuse_fixed_fields(fields)
        _parse_id(adapter_id)
        with self._locked():
            entry = self.resolve(adapter_id)
            metadata = dict(entry.metadata)
            _merge(metadata, fields)
            _write_json(entry.path / METADATA_FILE, metadata)
        return AdapterEntry(entry.name, entry.version, entry.path, metadata)

    # --- internals ----------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive lock across threads and processes (each call opens its own descriptor)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _inside(self, path: Path) -> Path:
        """``path`` if it resolves inside the registry root (defence in depth beyond the id grammar)."""
        if not self._is_inside(path):
            raise ValidationError(f"adapter path {path} leaves the registry {self.root}; {_ID_FORM}")
        return path

    def _is_inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.root.resolve())

    def _names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            child.name
            for child in self.root.iterdir()
            if _is_name(child.name) and child.is_dir() and self._is_inside(child)
        )

    def _versions(self, name: str) -> list[int]:
        name_dir = self._inside(self.root / name)
        if not name_dir.is_dir():
            return []
        versions = []
        for child in name_dir.iterdir():
            match = _VERSION_DIR.fullmatch(child.name)
            if match and (child / METADATA_FILE).is_file():
                versions.append(int(match[1]))
        return sorted(versions)

    def _last_version(self, name_dir: Path) -> int:
        """The highest version ever given to this name, removed ones included."""
        counter = name_dir / _LAST_VERSION_FILE
        recorded = int(counter.read_text()) if counter.is_file() else 0
        return max([recorded, *self._versions(name_dir.name)])

    def _entry(self, name: str, version: int) -> AdapterEntry:
        path = self._inside(self.root / name / f"v{version}")
        try:
            metadata = json.loads((path / METADATA_FILE).read_text())
        except FileNotFoundError:
            raise AdapterNotFoundError(f"adapter {name}@v{version} was removed while it was being read") from None
        return AdapterEntry(name, version, path, metadata)

    def _inventory(self) -> str:
        names = [name for name in self._names() if self._versions(name)]
        if not names:
            return "the registry is empty; add one with `stillhouse adapters add PATH --name NAME`"
        return f"it holds {', '.join(names)}"


def _is_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name


def _validate_name(name: str) -> None:
    if not isinstance(name, str) or not _is_name(name):
        raise ValidationError(f"invalid adapter name {name!r}: {_ID_FORM}")


def _parse_id(adapter_id: str) -> tuple[str, int | None]:
    match = _ADAPTER_ID.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if match is None or ".." in match["name"]:
        raise ValidationError(f"invalid adapter id {adapter_id!r}: {_ID_FORM}")
    return match["name"], int(match["version"]) if match["version"] else None


def _source_files(src: Path) -> tuple[dict[str, Path], list[Violation]]:
    """The files ``add`` copies from ``src`` (name -> the regular file it reads), and why any present one cannot be copied.

    Only regular files are copied; a symbolic link is followed only when it stays inside ``src``,
    so an adapter directory cannot pull other files of the machine into the registry.
    """
    if "\x00" in str(src):
        return {}, [Violation("path", f"{str(src)!r} holds a NUL character", "pass the adapter directory's path")]
    inside = src.resolve()
    files, violations = {}, []
    for file_name in (servability.CONFIG_FILE, servability.WEIGHTS_FILE, *_OPTIONAL_FILES):
        path = src / file_name
        if not path.exists() and not path.is_symlink():
            continue
        target = path.resolve()
        if path.is_symlink() and not target.is_relative_to(inside):
            fix = "copy the file into the adapter directory; links that leave it are not followed"
            violations.append(Violation(file_name, f"is a symbolic link to {target}, outside {inside}", fix))
        elif not target.is_file():
            violations.append(Violation(file_name, "is not a regular file", "replace it with a regular file"))
        else:
            files[file_name] = target
    return files, violations


def _refuse_fixed_fields(fields: dict) -> None:
    fixed = sorted(_FIXED_FIELDS & fields.keys())
    if fixed:
        raise ValidationError(
            f"metadata fields {', '.join(fixed)} describe the stored weights and are set by the registry; remove them"
        )


def _merge(metadata: dict, fields: dict) -> None:
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(metadata.get(key), dict):
            metadata[key] = {**metadata[key], **value}
        else:
            metadata[key] = value


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def _write_atomic(path: Path, text: str) -> None:
    """Write-then-rename, so a reader (or a crash) sees the old file or the new one, never a mix."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
