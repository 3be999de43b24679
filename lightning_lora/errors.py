"""``CheckpointError``: one exception for checkpoint and adapter files that cannot be used.

A damaged file otherwise surfaces as whatever the reader trips over first — an ``EOFError``
with an empty message for an empty file, ``OSError: [Errno 22]`` for a truncated one, a
"weights only load failed" hint for random bytes, "incomplete metadata" for a damaged
safetensors file — and none of them names the file. Every reading path of lightning-lora
(``trainer.fit(ckpt_path=...)`` with :class:`~lightning_lora.LoRACallback`,
:func:`~lightning_lora.load_adapter_checkpoint`, :func:`~lightning_lora.load_adapter`,
:class:`~lightning_lora.AtomicCheckpointIO`) raises :class:`CheckpointError` instead, built
here: the path, its size, what is wrong with it, what to do, and the other files in the same
folder that do load, newest first.
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

PathLike = Union[str, Path]

#: How many loadable alternatives a message lists, and how many files are tried to find them.
MAX_LISTED = 5
MAX_PROBED = 20
_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit


class CheckpointError(ValueError):
    """A checkpoint or adapter file that cannot be used: damaged, of the wrong kind, or for another base.

    The message says, in this order: the path and its size, what is wrong, what to do, and
    which other files in that folder do load (newest first), so a user can pick one without
    trying each. It is a ``ValueError`` so code that handles bad input (the CLI among it)
    handles it too.

    Attributes:
        path: The file that could not be used.
        problem: What is wrong with it, in words.
        alternatives: Other files in its folder that load, newest first.

    Args:
        fix: What to do, for the message.
        listed: Whether the message lists ``alternatives`` (False where they do not help,
            e.g. an adapter for another base model).
        searched: The folder the alternatives were looked for in (default: the file's).
    """

    def __init__(
        self,
        path: PathLike,
        problem: str,
        fix: str,
        alternatives: Sequence[tuple[Path, str]] = (),
        *,
        listed: bool = True,
        searched: Optional[PathLike] = None,
    ) -> None:
        self.path = Path(path)
        self.problem = problem
        self.alternatives = [p for p, _ in alternatives]
        message = f"{self.path} ({file_size_text(self.path)}): {problem}. {fix}."
        if listed:
            folder = Path(searched) if searched is not None else self.path.parent
            if alternatives:
                shown = "; ".join(
                    f"{p.name if p.parent == folder else p.relative_to(folder) if p.is_relative_to(folder) else p} ({info})"
                    for p, info in alternatives
                )
                message += f"\nOther files in {folder} that do load, newest first: {shown}."
            else:
                message += f"\nNo other file in {folder} loads."
        super().__init__(message)


def file_size_text(path: PathLike) -> str:
    """``"1,234 bytes"``, ``"empty"``, or ``"missing"``."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return "missing"
    return "empty" if size == 0 else f"{size:,} bytes"


def describe_torch_file_problem(path: PathLike, error: BaseException) -> str:
    """What is wrong with a file ``torch.load`` failed on, judged from its bytes (``error`` is the failure)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (created, but nothing was written into it: a run killed while saving, or a full disk)"
    with path.open("rb") as f:
        head = f.read(8)
    detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else '(no message)'}"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return (
                "the file is truncated: it starts as a PyTorch archive but its end record is missing, so the write "
                f"stopped early ({detail})"
            )
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            return f"the archive holds objects that `torch.load(weights_only=True)` refuses to unpickle ({detail})"
        return f"the PyTorch archive is damaged inside ({detail})"
    if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy (non-zip) format
        return f"a legacy (non-zip) PyTorch file that does not load; it is likely truncated or damaged ({detail})"
    return (
        f"this is not a PyTorch checkpoint: it starts with bytes {head!r}, not a PyTorch archive "
        "(random or foreign data)"
    )


def describe_safetensors_problem(path: PathLike) -> Optional[str]:
    """What is structurally wrong with a safetensors file, or None when its header and sizes are consistent.

    A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
    (tensor dtypes, shapes and data offsets), then the tensor data.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (created, but nothing was written into it: a run killed while saving, or a full disk)"
    if size < 8:
        return f"the file is {size} bytes, too short for even the 8-byte safetensors header length"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _SAFETENSORS_MAX_HEADER:
            return (
                f"the first 8 bytes announce a {header_len:,}-byte header, which no safetensors file has: "
                "it is not a safetensors file (random or foreign data)"
            )
        if 8 + header_len > size:
            return f"the file is truncated: its header alone should be {header_len:,} bytes"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "its header is not valid JSON: the file is damaged or is not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not a JSON object: the file is damaged or is not a safetensors file"
    ends = [
        entry["data_offsets"][1]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2
    ]
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return f"the file is truncated: its tensors need {needed:,} bytes"
    return None


def loadable_alternatives(
    candidates: Iterable[Path],
    probe: Callable[[Path], str],
    exclude: Optional[PathLike] = None,
) -> list[tuple[Path, str]]:
    """Up to :data:`MAX_LISTED` of ``candidates`` that ``probe`` reads without raising, newest first.

    ``probe(path)`` loads the file as the failed reader would and returns a short description
    (e.g. ``"step 12"``). Only the :data:`MAX_PROBED` newest candidates are tried.
    """
    skip = _same_file_key(exclude) if exclude is not None else None
    files: list[tuple[float, Path]] = []
    for path in candidates:
        try:
            if path.is_file() and _same_file_key(path) != skip:
                files.append((path.stat().st_mtime, path))
        except OSError:
            continue
    found: list[tuple[Path, str]] = []
    for mtime, path in sorted(files, key=lambda item: (-item[0], item[1].name))[:MAX_PROBED]:
        try:
            info = probe(path)
        except Exception:  # noqa: BLE001 - any failure means "does not load"
            continue
        stamp = datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")
        found.append((path, f"{info}, written {stamp}" if info else f"written {stamp}"))
        if len(found) == MAX_LISTED:
            break
    return found


def sibling_files(path: PathLike) -> list[Path]:
    """Files next to ``path`` with the same suffix, leaving out hidden (e.g. in-progress temporary) files."""
    path = Path(path)
    folder = path.parent
    try:
        return [p for p in folder.iterdir() if p.suffix == path.suffix and not p.name.startswith(".")]
    except OSError:
        return []


def _same_file_key(path: PathLike) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)  # follows links: `last.ckpt` may link to another checkpoint
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
