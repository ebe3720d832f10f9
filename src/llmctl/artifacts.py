"""The artifact contract: every stage writes one directory, atomically, with a manifest.json.

A directory that holds ``manifest.json`` is complete; one without it is not. A stage works in a
sibling work directory ``.<name>.tmp-<stage>`` and publishes by renaming it into place, so a crash
never leaves something that looks finished. The work directory survives an interruption: a rerun
with the same parameters and inputs finds the shards it already finished there and skips them
(resume at shard granularity); a rerun with different parameters starts over. A finished stage
rerun with the same parameters and inputs is a no-op unless ``force`` is given.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_RUN_STATE = "run-state.json"


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, set | frozenset | tuple):
        return list(o)
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def finite_or_none(obj: Any) -> Any:
    """JSON has no NaN or Infinity: an undefined number (a metric over no items, no optimum when
    β ≤ 0) becomes null, so every JSON file llmctl writes is strict JSON."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, float) or (getattr(obj, "shape", None) == () and getattr(obj.dtype, "kind", "") == "f"):  # numpy scalars
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def dumps(obj: Any) -> str:
    return json.dumps(finite_or_none(obj), indent=2, sort_keys=False, default=_json_default, allow_nan=False) + "\n"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dumps(obj))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_fingerprint(path: Path, head_bytes: int = 1 << 20) -> str:
    """A cheap, stable identity for a raw input file: size plus a hash of its first and last MiB."""
    path = Path(path)
    st = path.stat()
    h = hashlib.blake2b(digest_size=16)
    h.update(str(st.st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(head_bytes))
        if st.st_size > 2 * head_bytes:
            f.seek(-head_bytes, os.SEEK_END)
            h.update(f.read(head_bytes))
    return "file:" + h.hexdigest()


def fingerprint(path: Path) -> str:
    """Identity of an input: the hash of an artifact's manifest, or of a raw file's content."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.is_file():
        return "manifest:" + hashlib.blake2b(manifest.read_bytes(), digest_size=16).hexdigest()
    if path.is_file():
        return file_fingerprint(path)
    raise UsageError(f"{path}: no such file or artifact directory; check the path")


#: options that change how a stage runs but never what it writes; they do not force a restart
EXECUTION_ONLY = frozenset({"workers", "threads", "force", "progress"})


def params_fingerprint(params: dict[str, Any], inputs: Sequence[dict[str, str]]) -> str:
    """What identifies a stage's result: its parameters (less the execution-only ones) and inputs."""
    semantic = {k: v for k, v in params.items() if k not in EXECUTION_ONLY}
    blob = json.dumps({"params": semantic, "inputs": list(inputs)}, sort_keys=True, default=_json_default)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a complete artifact, or a UsageError saying why there is none."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such artifact; run the stage that produces it first")
    if not path.is_dir():
        raise UsageError(f"{path}: expected an artifact directory (with {MANIFEST}), got a file")
    mf = path / MANIFEST
    if not mf.is_file():
        raise UsageError(
            f"{path}: not a complete llmctl artifact (no {MANIFEST}); rerun the stage that writes it"
        )
    try:
        data = json.loads(mf.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{mf}: unreadable manifest ({e}); rerun the stage with --force") from e
    fv = data.get("format_version", 0)
    if not isinstance(fv, int) or fv > FORMAT_VERSION:
        raise UsageError(
            f"{path}: written by a newer llmctl (format {fv}, this one reads ≤ {FORMAT_VERSION}); "
            "upgrade llmctl"
        )
    return data


def a_stage(stage: Any) -> str:
    """"a 'pretrain' artifact", "an 'export' artifact": a stage name with its article, for messages."""
    name = str(stage)
    vowel_sound = name[:1].lower() in "aeiou" or name == "sft"  # "an S-F-T"
    return f"{'an' if vowel_sound else 'a'} '{name}' artifact"


def require_artifact(path: Path, stages: Iterable[str]) -> dict[str, Any]:
    """Read an input artifact and check it is of a kind this stage accepts."""
    stages = tuple(stages)
    m = read_manifest(path)
    if m.get("stage") not in stages:
        want = " or ".join(stages)
        raise UsageError(f"{path}: is {a_stage(m.get('stage'))}, but this stage needs {want} output")
    return m


def input_record(path: Path) -> dict[str, str]:
    return {"path": str(Path(path).resolve()), "fingerprint": fingerprint(path)}


#: this process's locks on the outputs it is writing (lock file → fd); re-entrant within a process
_LOCKS: dict[Path, int] = {}


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def _lock(out: Path) -> None:
    """Hold an exclusive lock on ``out`` for this process: a second llmctl writing the same output
    at once would interleave its work directory (the kernel drops the lock when a process dies)."""
    path = _lock_path(out)
    if path in _LOCKS:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"{out}: another llmctl process is writing it now (lock {path.name}); wait for it to end or choose another --out"
        ) from None
    _LOCKS[path] = fd


def _unlock(out: Path) -> None:
    path = _lock_path(out)
    fd = _LOCKS.pop(path, None)
    if fd is not None:
        path.unlink(missing_ok=True)
        os.close(fd)


def _changed(state: dict[str, Any], params: dict[str, Any], inputs: list[dict[str, str]]) -> str:
    """What differs between a run's recorded options and inputs (an interrupted run's state file or
    a finished run's manifest) and these."""
    old = state.get("params")
    if not isinstance(old, dict):
        return "options or inputs"
    keys = sorted(k for k in set(old) | set(params) if json.dumps(old.get(k), sort_keys=True, default=str)
                  != json.dumps(params.get(k), sort_keys=True, default=str))
    parts = [f"options ({', '.join('--' + k.replace('_', '-') for k in keys[:5])})"] if keys else []
    if state.get("inputs") not in (None, inputs):
        parts.append("inputs")
    return " and ".join(parts) or "options or inputs"


@dataclass
class StageRun:
    """One execution of a stage writing the artifact directory ``out``.

    Use as::

        run = StageRun.open(out, "extract", params, inputs, force=force)
        if run.done:            # finished earlier with the same params and inputs
            return run.manifest
        for shard in shards:
            if run.has(name): continue      # resumed
            write to run.partial(name), then run.commit(name)
        run.finish(stats)
    """

    out: Path
    stage: str
    params: dict[str, Any]
    inputs: list[dict[str, str]]
    work: Path
    done: bool = False
    resumed: bool = False
    manifest: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    @classmethod
    def open(
        cls,
        out: Path,
        stage: str,
        params: dict[str, Any],
        inputs: Sequence[Path] = (),
        force: bool = False,
        flag: str = "--out",
    ) -> StageRun:
        """Open ``out`` for ``stage``; ``flag`` is the option that named it, for the messages."""
        out = Path(out).absolute()
        records = [input_record(p) for p in inputs]
        fp = params_fingerprint(params, records)
        work = out.parent / f".{out.name}.tmp-{stage}"
        run = cls(out=out, stage=stage, params=params, inputs=records, work=work)

        if out.exists():
            if not out.is_dir():
                raise UsageError(f"{out}: exists and is a file; choose another {flag} directory")
            mf = out / MANIFEST
            if mf.is_file():
                try:
                    old = json.loads(mf.read_text(encoding="utf-8"))
                except ValueError:
                    old = {}
                if old.get("stage") != stage:
                    raise UsageError(
                        f"{out}: holds a '{old.get('stage')}' artifact; choose another {flag} for {stage}"
                    )
                same = old.get("params_fingerprint") == fp
                if same and not force:
                    run.done, run.manifest = True, old
                    return run
                if not force:
                    raise UsageError(
                        f"{out}: holds a finished {stage} run with other {_changed(old, params, records)}; "
                        f"pass --force to replace it or choose another {flag}"
                    )
            elif any(out.iterdir()):
                raise UsageError(
                    f"{out}: exists, is not empty and is not an llmctl artifact; choose another {flag}"
                )
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"{out.parent}: cannot create the output's parent ({e.strerror})") from e
        if not os.access(out.parent, os.W_OK):
            raise UsageError(f"{out.parent}: not writable; choose a {flag} in a writable directory")
        _lock(out)

        state_file = work / _RUN_STATE
        if work.is_dir():
            try:
                state = json.loads(state_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                state = {}
            if state.get("params_fingerprint") == fp and not force:
                run.resumed = True
            elif state.get("params_fingerprint") and not force:
                # an interrupted run with other options or inputs: its progress is not thrown away unasked
                _unlock(out)
                raise UsageError(
                    f"{out}: an interrupted {stage} run with other {_changed(state, params, records)} is in {work}; "
                    "rerun with its options to resume it, or pass --force to discard it and start over"
                )
            else:
                shutil.rmtree(work)
        if not run.resumed:
            work.mkdir(parents=True)
            write_json_atomic(
                state_file, {"stage": stage, "params_fingerprint": fp, "started": run.started, "params": params, "inputs": records},
            )
        return run

    # -- shards -------------------------------------------------------------------------------
    def path(self, name: str) -> Path:
        """Final location of a file inside the work directory (its place in the artifact)."""
        return self.work / name

    def has(self, name: str) -> bool:
        """True if a shard with this name was committed, by this run or an interrupted one."""
        return (self.work / name).exists()

    def partial(self, name: str) -> Path:
        """Where to write a shard before it is committed; stale partials are discarded."""
        p = self.work / f"{name}.partial"
        if p.exists():
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def commit(self, name: str) -> Path:
        """Publish a finished shard inside the work directory (atomic rename)."""
        src, dst = self.work / f"{name}.partial", self.work / name
        os.replace(src, dst)
        return dst

    # -- publish ------------------------------------------------------------------------------
    def finish(self, stats: dict[str, Any], files: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
        """Write the manifest and move the work directory into place; return the manifest."""
        (self.work / _RUN_STATE).unlink(missing_ok=True)
        for leftover in self.work.rglob("*.partial"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
        if files is None:
            files = sorted(
                str(p.relative_to(self.work)) for p in self.work.rglob("*") if p.is_file() and p.name != MANIFEST
            )
        stats = dict(stats)
        stats.setdefault("wall_seconds", round(time.time() - self.started, 3))
        manifest = {
            "stage": self.stage,
            "llmctl_version": __version__,
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "params": self.params,
            "params_fingerprint": params_fingerprint(self.params, self.inputs),
            "inputs": self.inputs,
            "resumed": self.resumed,
            **extra,
            "stats": stats,
            "files": list(files),
        }
        write_json_atomic(self.work / MANIFEST, manifest)
        if self.out.exists():  # --force over a finished artifact: swap, then delete the old one
            trash = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, trash)
            os.replace(self.work, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.work, self.out)
        _unlock(self.out)
        self.manifest = manifest
        return manifest

    def abandon(self) -> None:
        """Remove the work directory (used when a stage fails before any shard is worth keeping)."""
        shutil.rmtree(self.work, ignore_errors=True)
        _unlock(self.out)


def _companion_is_current(path: Path, stage: str, owner: dict[str, Any], owner_out: Path) -> bool:
    """Whether ``path`` holds the finished ``stage`` artifact that the run whose manifest is
    ``owner`` (at ``owner_out``) wrote beside its output: not gone, not replaced by another run's."""
    try:
        m = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (m.get("stage") == stage and m.get("rejected_from") == str(Path(owner_out).absolute())
            and m.get("params_fingerprint") == owner.get("params_fingerprint"))


def open_with_rejected(
    out: Path, stage: str, rejected: Path | None, rejected_stage: str, params: dict[str, Any],
    inputs: Sequence[Path], force: bool = False,
) -> tuple[StageRun, StageRun | None]:
    """Open a stage's output and, with --keep-rejected, the companion artifact of the documents it
    removes (opened with the same parameters and inputs, so another run's is never overwritten
    unasked). The output is a no-op (``done``) only while that companion is still its own: gone or
    taken over by another run, both are redone (the finished output stays until the new one is
    published). A refused companion leaves no work dir behind for the output."""
    run = StageRun.open(out, stage, params, inputs, force=force)
    if run.done:
        if rejected is None or _companion_is_current(rejected, rejected_stage, run.manifest, out):
            return run, None
        run = StageRun.open(out, stage, params, inputs, force=True)
    if rejected is None:
        return run, None
    try:
        rej = StageRun.open(rejected, rejected_stage, params, inputs, force=force, flag="--keep-rejected")
    except UsageError:
        if not run.resumed:
            run.abandon()
        raise
    if rej.done:  # finished alongside an output that is gone: redo it with the output
        rej = StageRun.open(rejected, rejected_stage, params, inputs, force=True, flag="--keep-rejected")
    return run, rej


def shard_name(prefix: str, index: int, suffix: str) -> str:
    return f"{prefix}-{index:05d}{suffix}"
