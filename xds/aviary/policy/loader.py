"""Reading policy files, checking them against each other, and keeping the last good state.

Three layers, each usable on its own:

- ``parse_policy_text``: one file's text -> a Rollout or PolicyErrors (YAML and schema problems,
  with YAML field paths such as ``spec.endpoints[1]``).
- ``load_directory`` / ``validate_paths``: many files, plus the cross-file rules (unique rollout
  names; one rollout per host on a listener). Stateless: among conflicting files the lexically
  first wins.
- ``PolicyBook``: stateful. Decides what *runs*: a broken or conflicting file never takes down or
  displaces a rollout that is already serving.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from aviary.policy import schema
from aviary.policy.schema import FieldIssue, PolicyError, PolicySet, Rollout
from aviary.policy.yaml_guard import yaml_bomb

__all__ = [
    "MAX_POLICY_BYTES",
    "LoadResult",
    "PolicyBook",
    "load_directory",
    "load_paths",
    "parse_policy_text",
    "validate_paths",
]

WHOLE_FILE = "-"
_SUFFIXES = (".yaml", ".yml")
# One Rollout per file: 1 MiB is some 20,000 hosts, and takes about 1.5 s to parse and validate.
# Files, git commits and the admin API's Validate are all held to it (Validate refuses before parsing).
MAX_POLICY_BYTES = 1024 * 1024


# ------------------------------------------------------------------------------------- one file


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which plain YAML silently resolves to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_policy_text(text: str, file: str) -> tuple[Rollout | None, list[PolicyError]]:
    """Parse one policy document; on failure return every problem found, never raise."""
    if len(text) * 4 > MAX_POLICY_BYTES and (size := len(text.encode("utf-8", "surrogatepass"))) > MAX_POLICY_BYTES:
        return None, [PolicyError(file, WHOLE_FILE, f"file is {size:,} bytes; the limit is {MAX_POLICY_BYTES:,} bytes")]
    refused = yaml_bomb(text)
    if refused is not None:
        return None, [PolicyError(file, WHOLE_FILE, f"invalid YAML: {refused}")]
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_UniqueKeyLoader) if doc is not None]
    except yaml.YAMLError as exc:
        return None, [PolicyError(file, WHOLE_FILE, _yaml_reason(exc))]
    except (RecursionError, ValueError) as exc:  # e.g. an integer of more than 4300 digits
        return None, [PolicyError(file, WHOLE_FILE, f"cannot be read: {exc}")]
    if not documents:
        return None, [PolicyError(file, WHOLE_FILE, "file is empty (expected one Rollout document)")]
    if len(documents) > 1:
        reason = f"expected one YAML document per file, found {len(documents)}"
        return None, [PolicyError(file, WHOLE_FILE, reason)]
    document = documents[0]
    if not isinstance(document, dict):
        reason = f"expected a mapping with apiVersion, kind, metadata and spec, got {type(document).__name__}"
        return None, [PolicyError(file, WHOLE_FILE, reason)]
    try:
        return Rollout.model_validate(document, by_alias=True, by_name=False), []
    except ValidationError as exc:
        details = exc.errors()
    except (RecursionError, ValueError) as exc:
        return None, [PolicyError(file, WHOLE_FILE, f"cannot be read: {exc}")]
    # "needs at least 1 item" next to the reason the only item was dropped (however deep) is noise.
    inner = {tuple(error["loc"][:depth]) for error in details for depth in range(len(error["loc"]))}
    kept = [e for e in details if not (e["type"] == "too_short" and tuple(e["loc"]) in inner)]
    return None, [_translate(file, error) for error in kept]


def _yaml_reason(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None:
            return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return f"invalid YAML: {problem}"
    return f"invalid YAML: {exc}"


def _field_path(loc: Iterable[str | int]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or WHOLE_FILE


def _all_aliases() -> set[str]:
    names: set[str] = set()
    for value in vars(schema).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
            names.update(info.alias or name for name, info in value.model_fields.items())
    return names | {"stepWeight", "maxWeight", "pause"}


_KNOWN_FIELDS = _all_aliases()


def _translate(file: str, error: ErrorDetails) -> PolicyError:
    """Turn one pydantic error into a PolicyError with a YAML path and a sentence a user can act on."""
    loc: list[str | int] = list(error["loc"])
    kind, value = error["type"], error.get("input")
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldIssue):
        loc.extend(cause.path)
    if isinstance(cause, ValueError):
        reason = str(cause)
    elif kind == "missing":
        reason = "required field is missing"
    elif kind == "too_short":
        count = error.get("ctx", {}).get("min_length", 1)
        reason = f"needs at least {count} item{'s' if count != 1 else ''}"
    elif kind == "extra_forbidden":
        reason = f"unknown field {loc[-1]!r}"
        close = difflib.get_close_matches(str(loc[-1]), _KNOWN_FIELDS, n=1, cutoff=0.7)
        if close:
            reason += f" (did you mean {close[0]!r}?)"
    else:
        message = error["msg"]
        reason = message[:1].lower() + message[1:]
        if not isinstance(value, dict | list):
            shown = repr(value)
            reason += f", got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        if kind == "string_type" and value is not None:
            reason += " (quote it in YAML to make it a string)"
    return PolicyError(file, _field_path(loc), reason)


# ----------------------------------------------------------------------------------- many files


@dataclass(frozen=True)
class LoadResult:
    """One look at a policy directory.

    ``rollouts`` and ``errors`` are the stateless verdict (cross-file conflicts: the older file wins,
    by modification time, then name, so the file blamed is the one a running server refuses: the
    newcomer). ``valid`` keeps every rollout that was valid on its own, including conflict losers,
    because ``PolicyBook`` resolves conflicts in favour of what already serves.
    ``listed`` is False when the directory itself could not be read, so nothing can be concluded
    about which files went away.
    """

    rollouts: dict[str, tuple[Rollout, str]]
    errors: list[PolicyError]
    files: dict[str, str]
    valid: dict[str, Rollout] = field(default_factory=dict)
    listed: bool = True
    modified: dict[str, int] = field(default_factory=dict)  # file -> mtime (ns); git blobs have none

    def claim_order(self, file: str) -> tuple[int, str]:
        """Among newcomers, the older file claims first (then the lexically first)."""
        return self.modified.get(file, 0), file

    def file_errors(self) -> list[PolicyError]:
        """Errors of files that are broken on their own (not cross-file conflicts)."""
        return [error for error in self.errors if error.file not in self.valid]


def is_policy_file_name(name: str) -> bool:
    """The one rule for which names are policy files (directory, git tree, validate): ``*.yaml`` or
    ``*.yml``, not hidden (editors' and our own temporary files are)."""
    return name.endswith(_SUFFIXES) and not name.startswith(".")


def policy_files(directory: Path) -> list[Path]:
    """The policy files directly in ``directory``, for the server and both validates."""
    return sorted(entry for entry in directory.iterdir() if is_policy_file_name(entry.name) and entry.is_file())


def _read(path: Path) -> tuple[str | None, str, list[PolicyError]]:
    """Return (text, sha256, errors). An unreadable file hashes as "" but still counts as present."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, "", [PolicyError(file, WHOLE_FILE, f"cannot read file: {exc.strerror or exc}")]
    digest = hashlib.sha256(data).hexdigest()
    try:
        return data.decode("utf-8"), digest, []
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text: {exc.reason} at byte {exc.start}"
        return None, digest, [PolicyError(file, WHOLE_FILE, reason)]


Parsed = tuple[Rollout | None, list[PolicyError]]


class _ParsedFiles:
    """What the last directory load parsed, per file: (sha256 of its bytes, the parse result).

    A directory is loaded whole whenever anything in it changes (or seems to: a poll that read its
    fingerprint while files were being written loads it again). With a thousand policies, parsing
    every file again took seconds of CPU for one edited file; a file whose bytes are the same parses
    the same (``parse_policy_text`` is a function of the text and the file name), so only changed
    files are parsed. Holds the files of the latest load only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # loads run in a thread at start-up, in a worker later
        self._by_file: dict[str, tuple[str, Parsed]] = {}

    def parse(self, text: str, file: str, digest: str, seen: dict[str, tuple[str, Parsed]]) -> Parsed:
        with self._lock:
            cached = self._by_file.get(file)
        if cached is None or cached[0] != digest:
            cached = (digest, parse_policy_text(text, file))
        seen[file] = cached
        rollout, errors = cached[1]
        return rollout, list(errors)

    def keep(self, seen: dict[str, tuple[str, Parsed]]) -> None:
        with self._lock:
            self._by_file = seen


_PARSED = _ParsedFiles()


def _load_files(paths: Iterable[Path], errors: list[PolicyError], cache: _ParsedFiles | None = None) -> LoadResult:
    files: dict[str, str] = {}
    seen: dict[str, tuple[str, Parsed]] = {}
    valid: dict[str, Rollout] = {}
    modified: dict[str, int] = {}
    for path in paths:
        text, digest, read_errors = _read(path)
        files[str(path)] = digest
        with contextlib.suppress(OSError):
            modified[str(path)] = path.stat().st_mtime_ns
        errors.extend(read_errors)
        if text is None:
            continue
        if cache is not None:
            rollout, parse_errors = cache.parse(text, str(path), digest, seen)
        else:
            rollout, parse_errors = parse_policy_text(text, str(path))
        errors.extend(parse_errors)
        if rollout is not None:
            valid[str(path)] = rollout
    if cache is not None:
        cache.keep(seen)
    result = LoadResult({}, errors, files, valid, modified=modified)
    claims = _Claims()
    for file in sorted(valid, key=result.claim_order):
        conflicts = claims.conflicts(file, valid[file])
        errors.extend(conflicts)
        if not conflicts:
            claims.add(file, valid[file])
    result.rollouts.update(claims.rollouts())
    return result


def load_directory(path: Path) -> LoadResult:
    """Load ``*.yaml``/``*.yml`` directly inside ``path`` (no hidden files, no subdirectories)."""
    try:
        paths = policy_files(path)
    except OSError as exc:
        error = PolicyError(str(path), WHOLE_FILE, f"cannot read directory: {exc.strerror or exc}")
        return LoadResult({}, [error], {}, listed=False)
    return _load_files(paths, [], _PARSED)


def validate_paths(paths: Sequence[Path]) -> list[PolicyError]:
    """Check files and/or directories together, as ``aviary validate PATH...`` does."""
    return load_paths(paths).errors


def load_paths(paths: Sequence[Path]) -> LoadResult:
    """Files and/or directories loaded together: ``validate_paths`` with the valid rollouts too."""
    errors: list[PolicyError] = []
    selected: dict[Path, Path] = {}
    for path in paths:
        try:
            found = policy_files(path) if path.is_dir() else [path] if path.exists() else None
        except OSError as exc:
            errors.append(PolicyError(str(path), WHOLE_FILE, f"cannot read directory: {exc.strerror or exc}"))
            continue
        if found is None:
            errors.append(PolicyError(str(path), WHOLE_FILE, "no such file or directory"))
            continue
        for file in found:
            selected.setdefault(file.resolve(), file)
    return _load_files(selected.values(), errors)


# ---------------------------------------------------------------------------------- cross-file


class _Claims:
    """Who owns each rollout name and each (listener, host); holds one rollout per file at most."""

    def __init__(self) -> None:
        self._by_file: dict[str, Rollout] = {}
        self._names: dict[str, str] = {}
        self._hosts: dict[tuple[str, str], str] = {}

    @staticmethod
    def host_keys(rollout: Rollout) -> list[tuple[str, str]]:
        return [(rollout.spec.listener.key, host.casefold()) for host in rollout.spec.hosts]

    def add(self, file: str, rollout: Rollout) -> None:
        self._by_file[file] = rollout
        self._names[rollout.name] = file
        for key in self.host_keys(rollout):
            self._hosts[key] = file

    def remove(self, file: str) -> Rollout | None:
        rollout = self._by_file.pop(file, None)
        if rollout is not None:
            del self._names[rollout.name]
            for key in self.host_keys(rollout):
                del self._hosts[key]
        return rollout

    def conflicts(self, file: str, rollout: Rollout) -> list[PolicyError]:
        """Problems ``rollout`` from ``file`` would cause against the claims of *other* files."""
        errors: list[PolicyError] = []
        owner = self._names.get(rollout.name)
        if owner is not None and owner != file:
            reason = f"rollout name {rollout.name!r} is already used by {owner}"
            errors.append(PolicyError(file, "metadata.name", reason))
        for index, key in enumerate(self.host_keys(rollout)):
            owner = self._hosts.get(key)
            if owner is not None and owner != file:
                other = self._by_file[owner].name
                reason = (
                    f"host {rollout.spec.hosts[index]!r} on listener {key[0]} is already claimed by "
                    f"rollout {other!r} ({owner})"
                )
                errors.append(PolicyError(file, f"spec.hosts[{index}]", reason))
        return errors

    def serving(self) -> dict[str, Rollout]:
        return dict(self._by_file)

    def rollouts(self) -> dict[str, tuple[Rollout, str]]:
        return {rollout.name: (rollout, file) for file, rollout in sorted(self._by_file.items())}

    def policy_set(self) -> PolicySet:
        entries = self.rollouts()
        return PolicySet(
            rollouts={name: rollout for name, (rollout, _) in entries.items()},
            files={name: file for name, (_, file) in entries.items()},
        )


def orphan_conflicts(
    policy_set: PolicySet, orphans: Mapping[str, Rollout], kept: Mapping[str, Rollout] | None = None
) -> list[PolicyError]:
    """Hosts of `policy_set` that an orphaned rollout (its file removed, kept serving without
    --prune) still serves on the same listener: Envoy rejects a route configuration that carries a
    domain twice, and would then take no change for any rollout on that listener. `kept` are
    rollouts whose new version was refused and whose previous version therefore keeps serving."""
    served: dict[tuple[str, str], str] = {}
    for name, orphan in sorted(orphans.items()):
        for key in _Claims.host_keys(orphan):
            served.setdefault(key, f"orphaned rollout {name} (its policy file was removed; restart with --prune "
                                   "to drop it)")
    for name, previous in sorted((kept or {}).items()):
        for key in _Claims.host_keys(previous):
            served.setdefault(key, f"rollout {name} (its new version is refused, so its previous version keeps "
                                   "serving)")
    errors: list[PolicyError] = []
    for name, rollout in sorted(policy_set.rollouts.items()):
        if name in (kept or {}):
            continue
        file = policy_set.files.get(name, name)
        for index, key in enumerate(_Claims.host_keys(rollout)):
            holder = served.get(key)
            if holder is None:
                continue
            reason = f"host {rollout.spec.hosts[index]!r} on listener {key[0]} is still served by {holder}"
            errors.append(PolicyError(file, f"spec.hosts[{index}]", reason))
    return errors


class PolicyBook:
    """Remembers what is serving and applies new loads without ever disturbing it with bad input.

    Rules, in order: a file that is broken keeps its last good rollout; a file that disappeared
    takes its rollout away; a valid new version applies unless it conflicts with a claim held by
    another file. Claims held by what is already serving win; among newcomers the lexically first
    file wins. A rejected new version of a serving file leaves the old version serving.
    """

    def __init__(self) -> None:
        self._claims = _Claims()
        self._current = PolicySet()

    @property
    def current(self) -> PolicySet:
        return self._current

    def apply(self, result: LoadResult) -> tuple[PolicySet, list[PolicyError]]:
        if not result.listed:
            return self._current, list(result.errors)
        claims = self._claims
        for file in claims.serving():
            if file not in result.files:
                claims.remove(file)
        serving = claims.serving()
        changed = [f for f in sorted(result.valid) if serving.get(f) != result.valid[f]]
        # Files already serving go first so a newcomer cannot grab what they are about to release.
        pending = sorted(changed, key=lambda f: (f not in serving, *result.claim_order(f)))
        progress = True
        while pending and progress:
            progress = False
            for file in list(pending):
                old = claims.remove(file)
                if claims.conflicts(file, result.valid[file]):
                    if old is not None:
                        claims.add(file, old)
                    continue
                claims.add(file, result.valid[file])
                pending.remove(file)
                progress = True
        errors = result.file_errors()
        for file in pending:
            errors.extend(claims.conflicts(file, result.valid[file]))
        policy_set = claims.policy_set()
        if policy_set != self._current:
            self._current = policy_set
        return self._current, errors

