"""Bit-exact resume of ``trainer.fit(..., ckpt_path=...)`` for Lightning 2.6 with plain ``DataLoader``s.

Self-contained: a callback owns one :class:`ResumeState` and forwards its hooks to it (see the class
docstring for which hook calls which method).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher

log = logging.getLogger(__name__)

_VERSION = 1


def _python_rng_state() -> list:
    """``random.getstate()`` as plain lists, so that ``torch.load(weights_only=True)`` accepts it."""
    version, internal, gauss_next = random.getstate()
    return [version, list(internal), gauss_next]


def _set_python_rng_state(state: list) -> None:
    version, internal, gauss_next = state
    random.setstate((version, tuple(internal), gauss_next))


def _numpy_rng_state() -> list | None:
    """NumPy's legacy global RNG state as plain Python values (no numpy objects), or None without NumPy."""
    try:
        import numpy as np
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)]


def _set_numpy_rng_state(state: list | None) -> None:
    if state is None:
        return
    import numpy as np

    name, keys, pos, has_gauss, cached_gauss = state
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gauss))


def _global_rng_state() -> dict[str, Any]:
    """Torch (CPU and, if present, CUDA), Python and NumPy global RNG states, weights_only-loadable."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _python_rng_state(),
        "numpy": _numpy_rng_state(),
    }


def _set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    _set_python_rng_state(state["python"])
    _set_numpy_rng_state(state["numpy"])


def _train_loaders(trainer: pl.Trainer) -> list[object]:
    combined = trainer.fit_loop._combined_loader
    return list(combined.flattened) if combined is not None else []


def _loader_generators(trainer: pl.Trainer) -> list[torch.Generator]:
    """The ``torch.Generator``s that decide the train data order, deduplicated, in a stable order.

    ``DataLoader(generator=g)`` draws the iterator's base seed from ``g``, and ``RandomSampler`` draws its
    permutation from its own generator (the same ``g`` when built by ``DataLoader(shuffle=True)``).
    """
    found: dict[int, torch.Generator] = {}
    for loader in _train_loaders(trainer):
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, getattr(loader, "sampler", None), getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
    return list(found.values())


def _rng_snapshot(trainer: pl.Trainer) -> dict[str, Any]:
    return {"global": _global_rng_state(), "loaders": [g.get_state() for g in _loader_generators(trainer)]}


def _restore_rng_snapshot(trainer: pl.Trainer, snapshot: dict[str, Any]) -> None:
    _set_global_rng_state(snapshot["global"])
    generators = _loader_generators(trainer)
    if len(generators) != len(snapshot["loaders"]):
        log.warning(
            "Resume: the train DataLoader has %d generator(s), the checkpoint %d; their states are not restored,"
            " so the shuffle order may differ from the uninterrupted run.",
            len(generators),
            len(snapshot["loaders"]),
        )
        return
    for generator, state in zip(generators, snapshot["loaders"]):
        generator.set_state(state)


class ResumeState:
    """Makes ``trainer.fit(fresh_model, ckpt_path=ckpt)`` continue bit-identically to an uninterrupted run.

    Plain Lightning 2.6 is not exact here (``shared/notes/exact-resume.md``, Lightning issues 19403, 19815):

    * **Mid-epoch checkpoints** (``ModelCheckpoint(every_n_train_steps=k)``): Lightning counts from batch ``k``
      but restarts a plain ``DataLoader`` at batch 0. :meth:`on_train_start` re-creates the epoch's iterator
      with the data-order RNG states recorded when the epoch started, and drops the ``k`` consumed batches.
    * **Epoch-end checkpoints** (saved in ``on_train_epoch_end``, Lightning's default, with or without a val
      loop): the loop state says "epoch not completed", and with ``max_steps`` the resumed run replays a
      batch. :meth:`load_state_dict` rewrites ``checkpoint["loops"]`` to "epoch completed, next epoch not
      started" and :meth:`on_train_start` stops the epoch loop from treating its first epoch as a restart.
    * **RNG**: Lightning saves no RNG state, so dropout masks and later shuffles differ. The torch (CPU, CUDA),
      Python, NumPy and train-``DataLoader`` generator states are saved as tensors / plain lists (loadable with
      ``torch.load(weights_only=True)``) and restored in :meth:`on_train_start`, *after* the data iterator is
      created and positioned, because creating and advancing it draws from these RNGs.

    Wiring (a ``Callback`` forwards, in this order of Lightning's ``fit``):

    1. ``on_load_checkpoint(trainer, pl_module, checkpoint)`` -> :meth:`load_state_dict` (before the loops
       are restored, so the loop fix takes effect).
    2. ``on_train_start(trainer, pl_module)`` -> :meth:`on_train_start`.
    3. ``on_train_epoch_start(trainer, pl_module)`` -> :meth:`on_train_epoch_start`.
    4. ``on_save_checkpoint(trainer, pl_module, checkpoint)`` -> store :meth:`state_dict` in the checkpoint.

    Exact (``torch.equal`` on all weights; CPU, ``32-true``, ``num_workers=0``, deterministic dataset):
    mid-epoch and epoch-end checkpoints, ``max_steps`` or ``max_epochs``, with or without a validation loop,
    ``shuffle=False`` and ``shuffle=True`` (seeded ``generator`` or the global RNG), across later epochs.

    Also measured exact: a checkpoint written in ``on_train_batch_end`` right before a validation run
    (``every_n_train_steps`` on the last batch of an epoch, or on a ``val_check_interval`` batch), and a resume
    from a checkpoint written by a resumed run. The first relies on Lightning's fast-forward of the skipped
    validation building the val iterator, which draws the same base seed from the global RNG as the real
    validation did; validation that draws more (a val ``RandomSampler`` without a generator, RNG use in
    ``validation_step``) makes later dropout masks differ there.

    Not exact / not handled:

    * ``num_workers > 0`` with shuffling when the checkpoint is in the first epoch of a run (that iterator is
      built before any callback hook and samples eagerly); ``persistent_workers=True`` with shuffling; random
      transforms in worker processes (worker seeds derive from the iterator's base seed);
    * RNG draws in ``on_train_epoch_start`` hooks that run after this one, ``training_step(dataloader_iter)``,
      ``reload_dataloaders_every_n_epochs``; iterable datasets of unknown length are skipped through the
      fetcher but untested;
    * ``ReduceLROnPlateau`` epoch steps in the first resumed epoch (Lightning skips them while restarting);
    * stateful loaders (``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``): the data
      position is left to Lightning (no skipping here); only the global RNG states are restored;
    * Lightning itself does not call ``on_train_epoch_start`` for the epoch after a checkpoint written on the
      last batch of an epoch (the weights are still exact).
    """

    def __init__(self) -> None:
        self._epoch_start: dict[str, Any] | None = None  # RNG snapshot + how the epoch's iterator was built
        self._loaded: dict[str, Any] | None = None  # state from the checkpoint, consumed in on_train_start

    def state_dict(self, trainer: pl.Trainer) -> dict[str, Any]:
        """Snapshot for the checkpoint; call from ``Callback.on_save_checkpoint``.

        Records where in the epoch the save happens, the RNG states at this moment, and the data-order RNG
        states recorded at the start of the current epoch (needed to rebuild its shuffle on resume).
        """
        fit_loop = trainer.fit_loop
        epoch_progress = fit_loop.epoch_progress.total
        return {
            "version": _VERSION,
            "epoch_finished": epoch_progress.processed >= epoch_progress.started,
            "batches_consumed": fit_loop.epoch_loop.batch_progress.current.ready,
            "rng": _rng_snapshot(trainer),
            "epoch_start": self._epoch_start,
        }

    def load_state_dict(self, trainer: pl.Trainer, state: dict[str, Any], checkpoint: dict[str, Any]) -> None:
        """Keep ``state`` for :meth:`on_train_start` and fix the loop state of epoch-end checkpoints.

        Must run from ``Callback.on_load_checkpoint``: Lightning restores ``checkpoint["loops"]`` only later
        (in ``restore_training_state``), so editing it here changes how the loops restart. A checkpoint saved
        in ``on_train_epoch_end`` has ``processed == completed + 1``; Lightning then restarts "at the end of"
        that epoch and, under ``max_steps``, trains one extra batch. Marking the epoch completed and the batch
        counters of the epoch as zero makes the fit loop start the next epoch normally.
        """
        if state.get("version") != _VERSION:
            log.warning("Resume: unknown resume state version %r; resuming like plain Lightning.", state.get("version"))
            return
        self._loaded = state
        self._epoch_start = state["epoch_start"]
        if state["epoch_finished"] and "loops" in checkpoint:
            fit_state = checkpoint["loops"]["fit_loop"]
            for counters in (fit_state["epoch_progress"]["total"], fit_state["epoch_progress"]["current"]):
                counters["completed"] = counters["processed"]
            batch_progress = fit_state["epoch_loop.batch_progress"]
            batch_progress["current"] = {key: 0 for key in batch_progress["current"]}
            batch_progress["is_last_batch"] = False

    def on_train_start(self, trainer: pl.Trainer) -> None:
        """Position the train data and restore RNG states; call from ``Callback.on_train_start``.

        Runs after ``FitLoop.setup_data`` built the train iterator and after the loops were restored, and
        before the first batch is fetched: the last moment to rebuild and advance the iterator. The RNG
        states saved with the checkpoint are restored last, because building and advancing the iterator
        draws from the global and the ``DataLoader``'s RNGs.
        """
        state, self._loaded = self._loaded, None
        if state is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if state["epoch_finished"] and epoch_loop.restarting:
            # With `max_steps` the fit loop always "restarts"; its epoch loop would then treat the next epoch as
            # a restart (skip one validation check iteration, count one logging step twice). It is a fresh one.
            epoch_loop.restarting = False
        fetcher = trainer.fit_loop._data_fetcher
        loaders = _train_loaders(trainer)
        if fetcher is None or not loaders:
            _restore_rng_snapshot(trainer, state["rng"])
            return
        if all(isinstance(loader, _Stateful) for loader in loaders):
            log.info("Resume: the train loader is stateful; Lightning restores its position.")
            _restore_rng_snapshot(trainer, state["rng"])
            return
        if isinstance(fetcher, _DataLoaderIterDataFetcher):
            log.warning("Resume: `training_step(dataloader_iter)` is not supported; the data position is not fixed.")
            _restore_rng_snapshot(trainer, state["rng"])
            return

        consumed = state["batches_consumed"]
        if state["epoch_finished"] or consumed >= trainer.num_training_batches:
            self._start_next_epoch(trainer, state)
        elif consumed > 0:
            self._skip_consumed_batches(trainer, state, consumed)
        else:
            _restore_rng_snapshot(trainer, state["rng"])

    def on_train_epoch_start(self, trainer: pl.Trainer) -> None:
        """Record the data-order RNG states of this epoch; call from ``Callback.on_train_epoch_start``.

        The shuffle of an epoch is drawn from these states. For the first epoch of a run the iterator already
        exists (built in ``FitLoop.setup_data``, its base seed drawn; the permutation is drawn lazily at the
        first batch); for later epochs it is built right after this hook. Which case applied is stored so a
        mid-epoch resume can rebuild the same permutation.
        """
        fit_loop = trainer.fit_loop
        built_after_hook = (
            trainer.current_epoch > 0 and not fit_loop.is_resuming and not fit_loop.epoch_loop.restarting
        )
        self._epoch_start = {"rng": _rng_snapshot(trainer), "iterator_built_after": built_after_hook}

    def _start_next_epoch(self, trainer: pl.Trainer, state: dict[str, Any]) -> None:
        """Resume at an epoch boundary: rebuild the iterator from the RNG states of the save, as run A did."""
        _restore_rng_snapshot(trainer, state["rng"])
        self._epoch_start = {"rng": _rng_snapshot(trainer), "iterator_built_after": True}
        iter(trainer.fit_loop._data_fetcher)
        log.info("Resume: starting epoch %d with a fresh train iterator.", trainer.current_epoch)

    def _skip_consumed_batches(self, trainer: pl.Trainer, state: dict[str, Any], consumed: int) -> None:
        """Resume mid-epoch: rebuild this epoch's iterator as run A had it and drop ``consumed`` batches."""
        fetcher = trainer.fit_loop._data_fetcher
        epoch_start = state["epoch_start"]
        if epoch_start is None:
            log.warning(
                "Resume: no epoch-start RNG states in the checkpoint; skipping %d batches of a reshuffled epoch.",
                consumed,
            )
        else:
            _restore_rng_snapshot(trainer, epoch_start["rng"])
            if epoch_start["iterator_built_after"]:
                iter(fetcher)
        for loader in _train_loaders(trainer):
            _set_sampler_epoch(loader, trainer.current_epoch)
        for _ in range(consumed):
            next(fetcher)
        # the epoch loop adds the restored `batch_progress.current.ready` to `fetched` itself
        fetcher.fetched -= consumed
        _restore_rng_snapshot(trainer, state["rng"])
        log.info("Resume: skipped %d consumed batches of epoch %d.", consumed, trainer.current_epoch)
