"""Atomic, durable checkpoint files: ``AtomicCheckpointIO`` and the ``atomic_write`` it is built on.

Lightning 2.6's default (``TorchCheckpointIO``) serialises a checkpoint, writes it through
fsspec and never fsyncs; where the temporary file and the checkpoint folder lie on different
filesystems the final move is a copy, so a kill at the wrong moment leaves a truncated
``last.ckpt``, a power cut can lose a "saved" checkpoint, and every interrupted save leaves a
checkpoint-sized temporary file behind. Here a local file is written as::

    <folder>/.<name>.tmp-<host>-<pid>-<random>   written, flushed, fsync'ed
    os.replace(temporary, <folder>/<name>)        atomic: same folder, same filesystem
    fsync(<folder>)                               the rename itself survives a power cut

so the target is at every moment either its old complete version or the new complete one.
Temporary files of dead processes on this host are removed the first time a run writes to
or reads from their folder. Remote (fsspec) paths such as ``s3://`` keep their filesystem's
own semantics: :class:`AtomicCheckpointIO` hands them to Lightning's ``TorchCheckpointIO``
(object stores replace an object in one request; other remote filesystems give what they give).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import IO, Any, Callable, Optional, Union

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

from lightning_lora.errors import CheckpointError, describe_torch_file_problem, loadable_alternatives, sibling_files

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
_TEMP_MARK = ".tmp-"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>[^-]+)-(?P<pid>\d+)-[0-9a-f]+$")


def is_local_path(path: PathLike) -> bool:
    """Whether ``path`` is on the local filesystem (else an fsspec URL such as ``s3://``)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def temp_path_for(target: PathLike) -> Path:
    """A fresh temporary path next to ``target``, named so :func:`remove_stale_temps` can tell whose it is."""
    target = Path(target)
    return target.with_name(f".{target.name}{_TEMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a folder; the data itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write(target: PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a local file atomically and durably: ``write(f)`` fills a temporary file next to
    ``target``, which is flushed, fsync'ed and renamed over ``target``; then the folder is fsync'ed.

    On any error (or a kill) ``target`` keeps its previous content; the temporary file is
    removed on errors, and by :func:`remove_stale_temps` after a kill.

    Returns:
        ``target`` as a ``Path``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(target)
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_bytes(target: PathLike, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(target, lambda f: f.write(data))


def remove_stale_temps(folder: PathLike) -> list[Path]:
    """Remove temporary files :func:`atomic_write` left in ``folder`` when its process was killed.

    Only files of processes on this host that no longer run are removed; a temporary file of
    a live process (another run saving into the same folder) or of another host is left alone.

    Returns:
        The removed paths.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        match = _TEMP_RE.match(path.name)
        if match is None or match["host"] != _HOST or _process_alive(int(match["pid"])):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()  # folders: save_merged's staging
            removed.append(path)
        except OSError:
            continue
    if removed:
        log.info("Removed %d temporary file(s) of interrupted saves in %s.", len(removed), folder)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def load_torch_file(path: PathLike, fix: str, probe: Optional[Callable[[Path], str]] = None, **load_kwargs: Any) -> Any:
    """``torch.load(path, **load_kwargs)`` that raises :class:`CheckpointError` for a damaged file.

    Args:
        fix: What the user should do, for the message.
        probe: Reads a sibling file as the caller would (returning a short description); the
            message lists the siblings it accepts. Defaults to a plain ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: It exists but does not load.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        return torch.load(path, **load_kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to read is reported with the file's name
        problem = describe_torch_file_problem(path, err)
        probe = probe or (lambda p: _describe_loaded(torch.load(p, **{**load_kwargs, "mmap": True})))
        raise CheckpointError(path, problem, fix, loadable_alternatives(sibling_files(path), probe, path)) from err


def _describe_loaded(checkpoint: Any) -> str:
    if isinstance(checkpoint, dict) and "global_step" in checkpoint:
        return f"step {checkpoint['global_step']}"
    return ""


#: What to do when a checkpoint to resume from does not load.
RESUME_FIX = (
    "Resume from another checkpoint with trainer.fit(ckpt_path=...), or set LoRACallback(resume_fallback=True) "
    "(CLI: --lora.resume_fallback true) to resume from the newest one beside it that loads"
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes local checkpoints atomically and durably, and names damaged files.

    * **save**: :func:`atomic_write` of ``torch.save(checkpoint)`` (streamed to the temporary
      file next to the target, no in-memory copy): a checkpoint is never seen half-written,
      whatever moment the process is killed at, and survives a power cut once saved.
    * **load**: a file that does not load raises :class:`~lightning_lora.CheckpointError`
      naming it, its size and what is wrong, and listing the checkpoints beside it that load.
    * **stale temporary files** of killed runs are removed the first time this plugin
      writes to, or reads from, a folder.
    * **remote paths** (``s3://``, ``gs://``, ... any non-local fsspec filesystem) are written
      and read by Lightning's ``TorchCheckpointIO``, with that filesystem's own guarantees.

    :class:`~lightning_lora.LoRACallback` installs it when the trainer uses Lightning's default
    checkpoint IO; to use it elsewhere::

        trainer = L.Trainer(plugins=[AtomicCheckpointIO()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[str] = set()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        self.clean_folder(Path(path).parent)
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    @override
    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if not is_local_path(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        self.clean_folder(Path(path).parent)
        return load_torch_file(path, RESUME_FIX, map_location=map_location, weights_only=weights_only)

    def clean_folder(self, folder: PathLike) -> None:
        """:func:`remove_stale_temps` in ``folder``, once per folder for this plugin."""
        key = os.path.abspath(folder)
        if key not in self._cleaned:
            self._cleaned.add(key)
            remove_stale_temps(folder)


def install_atomic_checkpoint_io(strategy: Any) -> bool:
    """Make ``strategy`` write with :class:`AtomicCheckpointIO` if it uses Lightning's default ``TorchCheckpointIO``.

    Also fills a wrapper plugin (e.g. ``AsyncCheckpointIO``) whose base is the default.
    Any other plugin — the user's choice — is left alone.

    Returns:
        Whether the strategy now writes through :class:`AtomicCheckpointIO`.
    """
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    current = strategy.checkpoint_io  # Lightning creates its default TorchCheckpointIO on first access
    if isinstance(current, AtomicCheckpointIO):
        return True
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    if isinstance(current, _WrappingCheckpointIO):
        inner = current.checkpoint_io
        if isinstance(inner, AtomicCheckpointIO):
            return True
        if inner is None or type(inner) is TorchCheckpointIO:
            current._checkpoint_io = AtomicCheckpointIO()
            current._base_checkpoint_io_configured = True
            return True
    return False
