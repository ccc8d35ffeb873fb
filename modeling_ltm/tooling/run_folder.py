"""The run folder of `ltm train` (`--output_dir`): one writer at a time, a run id tying each checkpoint to its run, and
a final save that replaces the model in one step.

- **Lock** (`RunLock`): `ltm-train.lock` in the folder, held with `fcntl.flock` for the whole run and holding the
  holder's pid, host, process start time and start date. A second `ltm train` into the same folder stops with one line
  naming the holder. The kernel drops the lock of a killed process, so a lock file left by a dead process is taken over
  (with a warning that names it); where `flock` is not available, a lock whose pid is dead on this host is.
- **Run id** (`new_run_id`, `RUN_RECORD_NAME`): a fresh run writes `ltm_run.json` (`{"run_id": uuid4 hex, ...}`) into
  the folder, and every checkpoint gets one (written last, after Trainer's files). Resuming continues only checkpoints
  whose run id is the folder's.
- **Atomic final save** (`replace_final_files`): the new model, tokenizer, metrics and state are written into a
  temporary sibling folder `.<name>.ltm-final-save`, every other entry of the run folder (checkpoints, logs, the lock,
  an export) is hard-linked into it, and the two folders are exchanged with one `renameat2(RENAME_EXCHANGE)` (Linux);
  a kill at any moment leaves the old complete model or the new complete one, never a mix. Elsewhere the exchange is
  two renames, with a moment in which the folder is missing (`recover_final_save` puts the complete one back).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path

from .cli_errors import CLIError


LOCK_NAME = "ltm-train.lock"
RUN_RECORD_NAME = "ltm_run.json"
FINAL_RECORD_NAME = "ltm_final_save.json"
STAGING_SUFFIX = ".ltm-final-save"
OLD_SUFFIX = ".ltm-final-old"
REMOVING_PREFIX = ".ltm-removing-"
# The model package: its top-level modules are exactly what ships as remote code (this tooling never ships).
MODEL_PACKAGE = Path(__file__).parent.parent
# What `save_pretrained` copies next to the weights for `trust_remote_code=True` and `ltm export` copies too: every
# top-level module of the model package but `__init__.py` (tests/test_structure.py checks this equals transformers'
# `get_relative_import_files` closure of modeling_ltm.py and configuration_ltm.py).
REMOTE_CODE_FILES = tuple(sorted(path.name for path in MODEL_PACKAGE.glob("*.py") if path.name != "__init__.py"))
# The files of a saved model: weights, configs, remote code, tokenizer and card. A final save of `ltm train` and
# `ltm export` replace these in an existing folder (removing stale ones, e.g. the shards of an earlier sharded save)
# and leave every other file there untouched.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "README.md", *REMOTE_CODE_FILES, "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja",
)  # fmt: skip
# Fault injection: the crash-safety tests run real `ltm train` / `ltm export` processes (subprocesses: no monkeypatch
# reaches them) and need one stopped at a named moment, to kill it there (tests/test_run_safety.py,
# tests/test_reliability3_export.py). Unset in any real run, where the hook is one environment lookup.
FAULT_INJECTION_PAUSE_ENV = "LTM_TEST_PAUSE_AT"


def pause_for_fault_injection(point: str) -> None:
    """Fault-injection hook, not a test: when `$LTM_TEST_PAUSE_AT` names `point` (one of "final-save-written",
    "final-save-staged", "final-save-swapped", "final-save-renamed", "export-locked"), say so on stderr and sleep,
    so that a crash-safety test can kill the process at exactly that moment. Does nothing otherwise."""
    if os.environ.get(FAULT_INJECTION_PAUSE_ENV) == point:
        print(f"ltm-test-paused-at {point} pid {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(600)


def _warn(message: str) -> None:
    print(f"ltm train: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux `/proc`), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22 of stat, counted after the command name


def process_alive(pid: int, start_time: str | None = None) -> bool:
    """Whether process `pid` runs on this host (and, when `start_time` is given and readable, is that process and
    not a later one that reused its pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    now = process_start_time(pid)
    return start_time is None or now is None or now == start_time


# ---------------------------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------------------------


def _holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pid_start_time": process_start_time(os.getpid()),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv[:1] + sys.argv[1:6]) + (" ..." if len(sys.argv) > 6 else ""),
    }


def describe_lock_holder(holder: dict) -> str:
    """A lock file's holder in words: its process id, host and start time."""
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


class RunLock:
    """An exclusive lock on a run folder for one `ltm train` (see the module docstring). Use as a context manager, or
    `acquire()` / `release()`. `created_dirs` lists the folders acquiring created (outermost first).

    Hand-written over `fcntl.flock` rather than `filelock.FileLock`: on its flock path FileLock records no holder
    (`FileLock.pid` raises AttributeError outside its soft fallback, observed with filelock 4.3.1), so the refusal and
    the take-over warning would still read and write our holder record by hand; its flock-less fallback writes its own
    marker into the lock file (our holder record would need a second file), and huggingface_hub accepts any
    filelock>=3.10, so which dead-holder check that fallback makes depends on the release installed."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created_dirs: list[Path] = []

    def remove_created_dirs(self) -> None:
        """Remove the folders `acquire` created, where they are still empty (a run that failed early leaves none)."""
        for folder in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def _read(self, fd: int) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = json.loads(os.read(fd, 65536).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # What the refusal names: the command that holds the lock, the folder as the user gave it, where else to go.
    command = "ltm train"

    def _subject(self) -> tuple[str, str]:
        return f"--output_dir {self.folder}", "--output_dir"

    def _refuse(self, holder: dict) -> CLIError:
        subject, elsewhere = self._subject()
        return CLIError(
            f"{subject} is in use by another `{self.command}` ({describe_lock_holder(holder)}; lock file "
            f"{self.path}): two of them would mix their files there. Wait for it to finish or choose another "
            f"{elsewhere}; if that process is gone, delete {self.path}."
        )

    def _took_over(self, previous: dict) -> None:
        _warn(
            f"took over the lock of {self.folder} left by an `ltm train` that is no longer running "
            f"({describe_lock_holder(previous)}); it was interrupted, so check the folder before trusting files it was "
            "writing (resume with --resume_from_checkpoint True)."
        )

    def acquire(self) -> RunLock:
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created_dirs = missing[::-1]
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = self._read(fd)
            locked = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                except BlockingIOError:
                    os.close(fd)
                    raise self._refuse(previous) from None
                except OSError as error:  # no flock on this file system: judge by the recorded holder
                    if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        os.close(fd)
                        raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (and removed) it while we opened it: try again
                os.close(fd)
                continue
            ours = previous.get("pid") == os.getpid() and previous.get("host") == socket.gethostname()
            if previous.get("pid") and not ours:
                here = previous.get("host") == socket.gethostname()
                dead = here and not process_alive(int(previous["pid"]), previous.get("pid_start_time"))
                if not locked and not dead:
                    os.close(fd)
                    raise self._refuse(previous)
                self._took_over(previous)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(_holder_record(), indent=1).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise CLIError(f"could not take the lock {self.path} (it kept changing); try again.")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------------------
# Run id
# ---------------------------------------------------------------------------------------------------------------


def new_run_id() -> str:
    return uuid.uuid4().hex


def write_json_atomically(path: Path, data: dict, indent: int = 1, sort_keys: bool = False) -> None:
    """Write `data` to `path` through a temporary file and a rename (a reader sees the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, strict: bool = False) -> dict | None:
    """The JSON object in `path`; None when the file is missing or holds no object. An unreadable or malformed file
    is None too, or with `strict` a `ValueError` naming it."""
    path = Path(path)
    if strict and not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        if strict:
            raise ValueError(f"Cannot read {path}: {error}") from error
        return None
    return data if isinstance(data, dict) else None


def run_id_of(folder: str | os.PathLike) -> str | None:
    """The run id recorded in `folder/ltm_run.json` (a run folder or a checkpoint), or None."""
    record = read_json(Path(folder) / RUN_RECORD_NAME)
    run_id = record.get("run_id") if record else None
    return run_id if isinstance(run_id, str) and run_id else None


def run_record(run_id: str, **extra) -> dict:
    return {"run_id": run_id, "host": socket.gethostname(), "written": datetime.now().isoformat(timespec="seconds"),
            **extra}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Removing an older run's checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_leftovers(folder: Path) -> None:
    """Delete what a killed `ltm train` of ours left: half-removed checkpoints in `folder`, and a final save's
    temporary siblings (after `recover_final_save`)."""
    for entry in folder.glob(f"{REMOVING_PREFIX}*") if folder.is_dir() else ():
        _remove_tree(entry)
    for suffix in (STAGING_SUFFIX, OLD_SUFFIX):
        _remove_tree(folder.parent / f".{folder.name}{suffix}")


def remove_checkpoints(folder: Path, names: Iterable[str]) -> None:
    """Remove checkpoint folders: each is first renamed to a hidden name (so a kill midway never leaves a half-deleted
    `checkpoint-N` that could pass for a complete one), then deleted."""
    token = uuid.uuid4().hex[:8]
    for name in names:
        hidden = folder / f"{REMOVING_PREFIX}{name}-{token}"
        os.rename(folder / name, hidden)
    for entry in folder.glob(f"{REMOVING_PREFIX}*-{token}"):
        _remove_tree(entry)


# ---------------------------------------------------------------------------------------------------------------
# Atomic final save
# ---------------------------------------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's `renameat2(RENAME_EXCHANGE)`; False where that is not available (the
    caller falls back to renames)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _link_tree(source: Path, target: Path) -> None:
    """`target` as a copy of `source` whose files are hard links (no data copied); symlinks are copied as links."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        shutil.copymode(source, target)
        for entry in source.iterdir():
            _link_tree(entry, target / entry.name)
    elif source.is_file():
        os.link(source, target)


def recover_final_save(folder: str | os.PathLike) -> None:
    """After a final save killed between the two renames of the fallback (no `RENAME_EXCHANGE`): the folder is missing
    and its complete new version waits in the staging sibling; put it back. A no-op otherwise."""
    folder = Path(folder).resolve()
    if folder.exists():
        return
    staging = folder.parent / f".{folder.name}{STAGING_SUFFIX}"
    old = folder.parent / f".{folder.name}{OLD_SUFFIX}"
    if (staging / FINAL_RECORD_NAME).is_file():
        os.rename(staging, folder)
        _warn(f"completed the final save into {folder} that an interrupted `ltm train` had left in {staging}.")
    elif old.is_dir():
        os.rename(old, folder)
        _warn(f"restored {folder} from {old}, left by an `ltm train` interrupted while saving its model.")


def _is_final(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def replace_final_files(
    folder: str | os.PathLike, write: Callable[[Path], None], patterns: Iterable[str], record: dict
) -> None:
    """Replace the final files of the run folder `folder` in one step.

    `write(staging)` writes the new final files (model, tokenizer, metrics, state) into an empty staging folder;
    `record` goes with them as `ltm_final_save.json`. Files of `folder` that match `patterns` (an earlier model's
    files) are dropped; everything else in `folder` is kept (hard links; nothing is copied). Without hard links or a
    writable parent folder, the files are moved into `folder` one at a time instead, with a warning: not atomic."""
    folder = Path(folder).resolve()
    patterns = (*patterns, FINAL_RECORD_NAME)
    staging = folder.parent / f".{folder.name}{STAGING_SUFFIX}"
    _remove_tree(staging)
    try:
        staging.mkdir()
    except OSError as error:
        _warn(f"cannot create {staging} ({error}); saving into {folder} file by file, not atomically.")
        return _replace_in_place(folder, write, patterns, record)
    try:
        shutil.copymode(folder, staging)
        write(staging)
        give_weights_the_usual_mode(staging)
        write_json_atomically(staging / FINAL_RECORD_NAME, record)
        written = {entry.name for entry in staging.iterdir()}
        pause_for_fault_injection("final-save-written")
        try:
            for entry in folder.iterdir():
                if entry.name not in written and not _is_final(entry.name, patterns):
                    _link_tree(entry, staging / entry.name)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise
            _warn(f"cannot hard-link the files of {folder} ({error}); saving file by file, not atomically.")
            move_staged_files(staging, folder, patterns)
            return
        pause_for_fault_injection("final-save-staged")
        inside = _cwd_inside(folder)
        if not exchange_paths(staging, folder):
            _swap_by_renames(staging, folder)
        _follow_cwd(folder, inside)
        pause_for_fault_injection("final-save-swapped")
    finally:
        _remove_tree(staging)


def current_umask() -> int:
    """The process's umask (from /proc on Linux, else by setting and restoring it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_weights_the_usual_mode(folder: str | os.PathLike) -> None:
    """Give the `*.safetensors` files of `folder` the mode any new file gets under the umask (0644 under 022), as the
    folder's other files have: safetensors writes them 0600 (through a private temporary file)."""
    mode = 0o666 & ~current_umask()
    for weights in Path(folder).glob("*.safetensors"):
        if weights.is_file() and not weights.is_symlink() and (weights.stat().st_mode & 0o777) != mode:
            os.chmod(weights, mode)


def _cwd_inside(folder: Path) -> Path | None:
    """The working directory relative to `folder` when it is `folder` or lies inside it (`cd run && ltm train
    --output_dir .`), else None."""
    try:
        return Path(os.getcwd()).resolve().relative_to(folder)
    except (OSError, ValueError):
        return None


def _follow_cwd(folder: Path, inside: Path | None) -> None:
    """After the exchange, a working directory that was `folder` (or inside it) is the old folder, now the staging
    path that is deleted next: move it to the same place in the new folder (its sub-folders are linked there)."""
    if inside is None:
        return
    target = folder / inside
    while target != folder and not target.is_dir():
        target = target.parent
    os.chdir(target)
    print(
        f"ltm train: the working directory was in {folder}, which the final save replaced in one step: a shell still "
        'in it sees the old, now deleted folder; `cd "$PWD"` there enters the new one.'
    )


def _swap_by_renames(staging: Path, folder: Path) -> None:
    """The exchange without `RENAME_EXCHANGE`: between the two renames the folder is missing (a kill there is undone
    by `recover_final_save`; an error puts the old folder back)."""
    old = folder.parent / f".{folder.name}{OLD_SUFFIX}"
    _remove_tree(old)
    os.rename(folder, old)
    try:
        pause_for_fault_injection("final-save-renamed")
        os.rename(staging, folder)
    except BaseException:
        os.rename(old, folder)
        raise
    os.rename(old, staging)


def move_staged_files(staging: Path, folder: Path, patterns: Iterable[str]) -> set[str]:
    """Move the files of `staging` into `folder`, first removing the files there whose names match `patterns` and
    that `staging` does not hold (every other file of `folder` stays); returns the names moved. Not atomic: each
    file is replaced on its own."""
    written = {entry.name for entry in staging.iterdir()}
    for entry in folder.iterdir():
        if entry.is_file() and entry.name not in written and _is_final(entry.name, patterns):
            entry.unlink()
    for name in sorted(written):
        os.replace(staging / name, folder / name)
    return written


def _replace_in_place(folder: Path, write: Callable[[Path], None], patterns, record: dict) -> None:
    staging = folder / f"{REMOVING_PREFIX}final-save-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        write(staging)
        write_json_atomically(staging / FINAL_RECORD_NAME, record)
        move_staged_files(staging, folder, patterns)
    finally:
        _remove_tree(staging)


__all__ = [
    "FINAL_RECORD_NAME",
    "LOCK_NAME",
    "MODEL_FILE_PATTERNS",
    "MODEL_PACKAGE",
    "REMOTE_CODE_FILES",
    "RUN_RECORD_NAME",
    "STAGING_SUFFIX",
    "RunLock",
    "current_umask",
    "exchange_paths",
    "give_weights_the_usual_mode",
    "move_staged_files",
    "new_run_id",
    "process_alive",
    "read_json",
    "recover_final_save",
    "remove_checkpoints",
    "remove_stale_leftovers",
    "replace_final_files",
    "run_id_of",
    "run_record",
    "write_json_atomically",
]
