"""The output directory: which directories a run may write or replace, and how it writes them.

A checkpoint is written to a hidden staging sibling and renamed into place only when it is
complete, so the requested name never holds a half-written checkpoint. The rules that keep a
user's files safe:

* A new or empty directory is written without asking.
* An existing non-empty directory is replaced only with ``overwrite`` (``--overwrite``), and only
  when it is one of our checkpoints: its ``config.json`` carries our ``quantization_config``
  record (``neural_quantization``) and every entry is a file a checkpoint of ours writes
  (:data:`CHECKPOINT_FILE_PATTERNS`: weights, configs, tokenizer files, the GGUF export). Anything
  else (a sub-directory, ``notes.txt``) makes it refuse, naming the entries, touching nothing.
* The current directory, any directory above it, the home directory and a file-system root are
  never written or replaced.
* Replacing is atomic for the user: the old checkpoint is renamed aside (``.NAME.old-PID-*``), the
  new one renamed into place, and only then is the old one deleted; a failure in between puts the
  old one back.
* Staging siblings (``.NAME.partial-PID-*``, ``.NAME.old-PID-*``) left by a process that no longer
  runs (killed during a save) are removed by the next save into the same place
  (:func:`remove_stale_staging` reports what it freed).
* Files and directories get the permissions the user's umask gives (0644 / 0755 by default), not
  the owner-only ones of :func:`tempfile.mkdtemp`, so a serving container running as another user
  can read the checkpoint.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "CHECKPOINT_FILE_PATTERNS",
    "OutputExistsError",
    "check_output_dir",
    "directory_bytes",
    "remove_stale_staging",
    "staged_directory",
]

# Every file a checkpoint of ours can hold: weights and their index, the model and generation
# configs, what tokenizers' save_pretrained writes, and the GGUF export.
CHECKPOINT_FILE_PATTERNS = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "*.model", "chat_template.jinja", "chat_template.json",
    "*.gguf",
)


class OutputExistsError(FileExistsError):
    """The output directory cannot be written or replaced; the message says why and what to do."""


def _protected_reason(resolved: Path) -> str | None:
    """Why ``resolved`` (an absolute path) must never be written or replaced, or None."""
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "it is the current directory"
    if resolved in cwd.parents:
        return "it holds the current directory"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == Path(resolved.anchor):
        return "it is a file-system root"
    return None


def _unrelated_entries(path: Path) -> list[str]:
    """Entries of ``path`` that no checkpoint of ours writes (sub-directories, other files)."""
    unrelated = []
    for entry in sorted(path.iterdir()):
        if entry.is_dir() or not any(fnmatch.fnmatch(entry.name, p) for p in CHECKPOINT_FILE_PATTERNS):
            unrelated.append(entry.name + ("/" if entry.is_dir() else ""))
    return unrelated


def _is_our_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and isinstance(quant.get("neural_quantization"), dict)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """The path to write the checkpoint to, or :class:`OutputExistsError` (before any work) when the
    rules of the module docstring forbid writing there. Reads only; changes nothing on disk."""
    path = Path(output_dir).expanduser()
    resolved = path.resolve()
    reason = _protected_reason(resolved)
    if reason:
        raise OutputExistsError(
            f"--output-dir {output_dir} cannot be used: {reason}, and a checkpoint is a directory of its own. "
            "Name a new directory, e.g. --output-dir ./my-model-w4."
        )
    if not path.exists():
        if path.is_symlink():
            raise OutputExistsError(f"--output-dir {output_dir} is a broken symbolic link; remove it or choose another.")
        return path
    if not path.is_dir():
        raise OutputExistsError(f"--output-dir {output_dir} exists and is not a directory; choose another --output-dir.")
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise OutputExistsError(
            f"output directory {path} already exists; choose another --output-dir, or pass --overwrite "
            "(overwrite=True) to replace it if it is a checkpoint written by neural-quantize."
        )
    if not _is_our_checkpoint(path):
        raise OutputExistsError(
            f"--overwrite refuses to replace {path}: it is not a checkpoint written by neural-quantize (its "
            "config.json has no neural_quantization record). Nothing was touched; choose a new --output-dir "
            "or remove that directory yourself."
        )
    unrelated = _unrelated_entries(path)
    if unrelated:
        shown = ", ".join(unrelated[:5]) + (f" and {len(unrelated) - 5} more" if len(unrelated) > 5 else "")
        raise OutputExistsError(
            f"--overwrite refuses to replace {path}: besides the checkpoint it holds {shown}, which no checkpoint "
            "writes. Nothing was touched; move those files out, or choose a new --output-dir."
        )
    return path


def directory_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (0 when it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _staging_pid(name: str, target_name: str) -> int | None:
    """The pid recorded in a staging sibling's name (``.NAME.partial-PID-xyz``), or None."""
    for kind in ("partial", "old"):
        prefix = f".{target_name}.{kind}-"
        if name.startswith(prefix):
            head = name[len(prefix):].split("-", 1)[0]
            return int(head) if head.isdigit() else -1  # -1: an unnamed (older) staging directory
    return None


def remove_stale_staging(target: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove the staging siblings of ``target`` whose writing process no longer runs.

    Returns ``(path, bytes)`` of what was removed, for the caller to report.
    """
    target = Path(target).expanduser().resolve()
    if not target.parent.is_dir():
        return []
    removed = []
    for sibling in sorted(target.parent.iterdir()):
        pid = _staging_pid(sibling.name, target.name)
        if pid is None or not sibling.is_dir() or pid == os.getpid() or (pid > 0 and _pid_alive(pid)):
            continue
        previous = sibling / "previous"
        if previous.is_dir() and not target.exists():  # killed between the two renames: put the old one back
            os.replace(previous, target)
        size = directory_bytes(sibling)
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append((sibling, size))
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(directory: Path) -> None:
    """Give ``directory`` and everything under it the permissions of a file created with the umask."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of ``target``; when the block succeeds it becomes ``target``.

    On any error (or Ctrl-C) the staging directory is removed and ``target`` is left as it was. An
    existing ``target`` (already checked by :func:`check_output_dir`) is renamed aside first and
    deleted only after the new directory is in place.
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tag = f"{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{tag}", dir=target.parent))
    try:
        yield staging
        apply_umask(staging)
        if not target.exists():
            os.replace(staging, target)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{tag}", dir=target.parent))
        os.replace(target, aside / "previous")
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside / "previous", target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
