"""``LoRACallback``: turn an existing LightningModule into a LoRA fine-tune with one line."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_lora.config import ALL_LINEAR, LoRAConfig, TargetSpec, _parse_dtype
from lightning_lora.inject import (
    ModulesToSave,
    adapter_state_keys,
    check_adapter_state,
    find_modules_to_save,
    inject_lora,
    lora_config_of,
    lora_layers,
    merge_lora,
)
from lightning_lora.guard import (
    DEAD_ADAPTER_CHECKS,
    DeadAdapterCheck,
    ForwardCallRecorder,
    check_loss_reaches_adapters,
    find_dead_adapters,
    layer_types,
    report_dead_adapters,
)
from lightning_lora.io import CHECKPOINT_CONFIG_KEY, save_adapter, save_merged
from lightning_lora.checkpoint_io import install_atomic_checkpoint_io
from lightning_lora.fingerprint import FINGERPRINT_CHECKS, FINGERPRINT_KEY, FingerprintCheck, base_fingerprint
from lightning_lora.fingerprint import check_base_fingerprint as check_fingerprint
from lightning_lora.recovery import ResumeGuard
from lightning_lora.monitor import LoRAMonitor
from lightning_lora.quantize import QUANT_TYPES, QuantType, dequantize_base, loadable_state_dict, quantize_for_fit
from lightning_lora.optim import OptimizerFactory, build_optimizer, check_optimizer_covers_trainable
from lightning_lora.resume import ResumeState
from lightning_lora.strategies import check_resume_supported, has_sharded_parameters
from lightning_lora.summary import LoRASummary, plan_lora, summarize_lora

#: Top-level checkpoint key holding the data position and RNG states for an exact resume.
CHECKPOINT_RESUME_KEY = "lora_resume_state"
_MERGED_ATTR = "_lora_merged_config"


class LoRACallback(Callback):
    r"""Fine-tune a LightningModule with LoRA, leaving the module's code unchanged.

    The callback injects adapters into the module, freezes the base model, keeps every
    checkpoint adapter-only (plus what an exact resume needs) and, at the end of ``fit``,
    merges the adapters into the base weights so the module is a plain model again.

    Example::

        trainer = L.Trainer(callbacks=[LoRACallback(r=8, alpha=16, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"])])
        trainer.fit(MyExistingModule())

    Args:
        r, alpha, dropout, target_modules, exclude_modules, modules_to_save, bias,
        use_rslora, adapter_dtype: The :class:`~lightning_lora.LoRAConfig` fields.
        config: A ready :class:`LoRAConfig` instead of the fields above.
        merge_on_fit_end: Merge the adapters into the base weights and remove the LoRA
            wrappers when ``fit`` ends.
        optimizer: Build the optimizer here instead of the module's
            ``configure_optimizers``, from a factory such as
            ``functools.partial(torch.optim.AdamW, lr=1e-4)``, with param groups for
            adapters, ``modules_to_save`` and no weight decay on biases and norms.
        lr_scheduler: With ``optimizer``: a factory ``optimizer -> LRScheduler``, stepped
            every training step (warm-up and decay schedules are per step in LoRA recipes).
        lora_b_lr_ratio: With ``optimizer``: LoRA+ — the B matrices' learning rate is the
            base rate times this ratio.
        save_peft_dir: When ``fit`` ends (before any merge), write the trained adapter to
            this directory as a PEFT adapter (see :func:`~lightning_lora.save_adapter`),
            loadable with ``peft.PeftModel.from_pretrained``. Global rank zero only.
        save_merged_dir: When ``fit`` ends, write the model with the adapter merged in to this
            directory (see :func:`~lightning_lora.save_merged`; a transformers model is saved with
            ``save_pretrained``, with the datamodule's or module's ``tokenizer`` when it has one).
            Global rank zero only.
        mha_projections: The :class:`~lightning_lora.LoRAConfig` field: which projections
            of a targeted ``nn.MultiheadAttention`` get adapters (``"q"``, ``"k"``, ``"v"``,
            ``"out"``).
        dead_adapter_check: Right before the first optimizer step of each ``fit``, adapters
            that received no gradient (never called, or not reaching the loss; see
            :mod:`lightning_lora.guard`) raise a ``DeadAdapterError`` (``"error"``), log a
            warning (``"warn"``) or are not checked (``"off"``).
        log_delta_every_n_steps: Every N optimizer steps, log each adapted module's ‖ΔW‖_F
            and effective rank to the Trainer's loggers, from the small factors only (see
            :class:`~lightning_lora.monitor.LoRAMonitor`). Off (None) by default.
        quantize_base: QLoRA: in ``setup``, before injecting, turn the frozen ``nn.Linear``
            layers (targets and others, never adapters or ``modules_to_save``) into 4-bit
            bitsandbytes ``Linear4bit`` (``"nf4"`` or ``"fp4"``); see :mod:`lightning_lora.quantize`.
            Merging at the end dequantizes: the merged model is full precision.
        double_quant: With ``quantize_base``: quantize the block scales too.
        compute_dtype: With ``quantize_base``: matmul dtype of the 4-bit layers; default
            float32 on CPU, bf16 (or fp16) on CUDA.
        atomic_checkpoints: When the trainer uses Lightning's default checkpoint IO, write
            checkpoints with :class:`~lightning_lora.AtomicCheckpointIO` (atomic, fsync'ed,
            no partial file after a kill). A checkpoint IO plugin of your own is left alone.
        check_base_fingerprint: A checkpoint trained on other base weights than the
            module's (its recorded fingerprint differs; see :mod:`lightning_lora.fingerprint`)
            raises a :class:`~lightning_lora.CheckpointError` (``"error"``) or only warns (``"warn"``).
        resume_fallback: When ``fit``'s checkpoint (also ``ckpt_path="last"``) does not load,
            resume from the newest checkpoint beside it that does, and log which and why,
            instead of raising :class:`~lightning_lora.CheckpointError` (see :mod:`lightning_lora.recovery`).
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: TargetSpec = ALL_LINEAR,
        exclude_modules: Optional[TargetSpec] = None,
        modules_to_save: Optional[list[str]] = None,
        bias: str = "none",
        use_rslora: bool = False,
        adapter_dtype: Optional[Union[str, torch.dtype]] = "float32",
        *,
        config: Optional[LoRAConfig] = None,
        merge_on_fit_end: bool = True,
        optimizer: Optional[OptimizerFactory] = None,
        lr_scheduler: Optional[Callable[[Optimizer], Any]] = None,
        lora_b_lr_ratio: float = 1.0,
        save_peft_dir: Optional[str] = None,
        save_merged_dir: Optional[str] = None,
        mha_projections: tuple[str, ...] = ("q", "k", "v", "out"),
        dead_adapter_check: DeadAdapterCheck = "error",
        log_delta_every_n_steps: Optional[int] = None,
        quantize_base: Optional[QuantType] = None,
        double_quant: bool = True,
        compute_dtype: Optional[Union[str, torch.dtype]] = None,
        atomic_checkpoints: bool = True,
        check_base_fingerprint: FingerprintCheck = "error",
        resume_fallback: bool = False,
    ) -> None:
        if dead_adapter_check not in DEAD_ADAPTER_CHECKS:
            raise ValueError(f"`dead_adapter_check` must be one of {DEAD_ADAPTER_CHECKS}, got {dead_adapter_check!r}.")
        if check_base_fingerprint not in FINGERPRINT_CHECKS:
            raise ValueError(
                f"`check_base_fingerprint` must be one of {FINGERPRINT_CHECKS}, got {check_base_fingerprint!r}."
            )
        self.atomic_checkpoints = atomic_checkpoints
        self.check_base_fingerprint = check_base_fingerprint
        self._resume_guard = ResumeGuard(fallback=resume_fallback)
        self._io_info_logged = False
        self.config = config or LoRAConfig(
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules,
            exclude_modules=exclude_modules,
            modules_to_save=modules_to_save,
            bias=bias,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
            mha_projections=mha_projections,
        )
        if lr_scheduler is not None and optimizer is None:
            raise ValueError("`lr_scheduler` needs `optimizer`: the callback can only schedule an optimizer it builds.")
        if lora_b_lr_ratio != 1.0 and optimizer is None:
            raise ValueError(
                "`lora_b_lr_ratio` needs `optimizer`: pass e.g. optimizer=functools.partial(torch.optim.AdamW, lr=1e-4) "
                "so the callback can build the LoRA+ param groups."
            )
        if lora_b_lr_ratio <= 0:
            raise ValueError(f"`lora_b_lr_ratio` must be positive, got {lora_b_lr_ratio}.")
        self.merge_on_fit_end = merge_on_fit_end
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.lora_b_lr_ratio = lora_b_lr_ratio
        self.save_peft_dir = save_peft_dir
        self.save_merged_dir = save_merged_dir
        self._resume = ResumeState()
        self.dead_adapter_check = dead_adapter_check
        self._guard: Optional[ForwardCallRecorder] = None  # set while the first step's check is pending
        self._guard_saw_backward = False
        self._trainer: Optional[pl.Trainer] = None
        self._wrapped_hooks: list[tuple[nn.Module, str]] = []
        self._monitor = LoRAMonitor(log_delta_every_n_steps) if log_delta_every_n_steps is not None else None
        if quantize_base is not None and quantize_base not in QUANT_TYPES:
            raise ValueError(f"`quantize_base` must be one of {QUANT_TYPES} or None, got {quantize_base!r}.")
        self.quantize_base = quantize_base
        self.double_quant = double_quant
        self.compute_dtype = _parse_dtype(compute_dtype) if isinstance(compute_dtype, str) else compute_dtype

    # -- public helpers --------------------------------------------------------------------
    def dry_run(self, pl_module: pl.LightningModule, sample_batch: Any = None) -> LoRASummary:
        """What the callback would adapt in ``pl_module`` and how much would train, without training.

        A module that builds its layers in ``configure_model`` is built first (that hook
        must be idempotent in Lightning anyway); nothing else about it changes. With a
        ``sample_batch``, one ``training_step`` forward/backward (no optimizer step) also
        finds dead adapters (``summary.dead_adapters``), and ``dead_adapter_check`` applies.
        """
        if not any(True for _ in pl_module.parameters()) and is_overridden("configure_model", pl_module):
            pl_module.configure_model()
        self._check_has_parameters(pl_module)
        summary = plan_lora(pl_module, self.config, sample_batch=sample_batch)
        report_dead_adapters(summary.dead_adapters, summary.adapted, self.dead_adapter_check, "in the dry run's sample batch")
        return summary

    # -- hooks ---------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Runs first in every ``fit``/``validate``/``test``/``predict``, before ``configure_model``,
        the checkpoint restore and the optimizer.

        Injects the adapters now, or — when the module builds its layers lazily in
        ``configure_model`` — right after that hook, which still precedes the restore. Also
        chains the module's checkpoint hooks: Lightning calls the module's
        ``on_save_checkpoint`` even for ``save_weights_only`` checkpoints (callbacks' are
        skipped), and the module's ``on_load_checkpoint`` before it loads the weights (the
        callbacks' after), so that is where adapter-only state is written and checked.
        """
        self._trainer = trainer
        self._install_checkpoint_io(trainer)
        if stage != "fit" and hasattr(pl_module, _MERGED_ATTR):
            rank_zero_info("LoRA adapters were merged at the end of fit; running the merged model as it is.")
            return
        self._chain_module_hook(pl_module, "on_save_checkpoint", self._make_checkpoint_adapter_only)
        self._chain_module_hook(pl_module, "on_load_checkpoint", self._complete_adapter_only_checkpoint)
        if stage == "fit" and self.optimizer is not None:
            pl_module.__dict__["configure_optimizers"] = self._configure_optimizers
            self._wrapped_hooks.append((pl_module, "configure_optimizers"))
        if stage == "fit":
            check_resume_supported(trainer.strategy, trainer.ckpt_path)
        # ModelParallelStrategy: `configure_model` applies fully_shard, which must see the adapters already.
        shards_in_configure = isinstance(trainer.strategy, ModelParallelStrategy) and any(True for _ in pl_module.parameters())
        if is_overridden("configure_model", pl_module) and not lora_layers(pl_module) and not shards_in_configure:
            self._chain_module_hook(pl_module, "configure_model", self._ensure_injected)
        else:
            self._ensure_injected(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the optimizers are built, before any step: every trainable parameter must be in one."""
        if trainer.optimizers:
            check_optimizer_covers_trainable(pl_module, trainer.optimizers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once the loops are restored and positioned: put RNG and data position back for exact resume.

        Also arms the dead-adapter check for the first optimizer step of this ``fit``.
        """
        self._resume.on_train_start(trainer)
        self._guard = None
        if self.dead_adapter_check != "off" and lora_layers(pl_module):
            if isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
                self._guard = ForwardCallRecorder(pl_module)
                self._guard_saw_backward = False
            else:  # sharded strategies keep gradients outside `param.grad`
                rank_zero_info(f"Dead-adapter check skipped under {type(trainer.strategy).__name__}.")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Until the first optimizer step: record which LoRA layers run (to name why an adapter is dead)."""
        if self._guard is not None and not self._guard.active:
            self._guard.start()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After the optimizer step: with ``log_delta_every_n_steps``, log ‖ΔW‖_F and effective ranks."""
        if self._monitor is not None:
            self._monitor.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """First step only: a loss that reaches no trainable parameter means every adapter is dead."""
        if self._guard is not None:
            when = "in the first training step"
            check_loss_reaches_adapters(pl_module, loss, self.dead_adapter_check, when, self._guard.called)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._guard is not None:
            self._guard_saw_backward = True

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        """Before the first optimizer step, after every accumulated backward: adapters without gradient are dead.

        Gradients are complete here (and not yet zeroed, which ``set_to_none`` would make
        look like "no gradient"). A step whose ``training_step`` returned None ran no
        backward and is not judged.
        """
        guard = self._guard
        if guard is None or not self._guard_saw_backward:
            return
        self._guard = None
        guard.stop()
        dead = find_dead_adapters(pl_module, guard.called)
        report_dead_adapters(dead, layer_types(pl_module), self.dead_adapter_check, "in the first training step")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the last checkpoint was written: export the PEFT directory, then fold the adapters in."""
        if self.save_peft_dir is not None and lora_layers(pl_module) and trainer.is_global_zero:
            save_adapter(pl_module, self.save_peft_dir)
            rank_zero_info(f"LoRA adapter written in PEFT format to {self.save_peft_dir}.")
        if self.save_merged_dir is not None and lora_layers(pl_module) and trainer.is_global_zero:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) or getattr(pl_module, "tokenizer", None)
            save_merged(pl_module, self.save_merged_dir, tokenizer=tokenizer)
            rank_zero_info(f"Merged model written to {self.save_merged_dir}.")
        if not self.merge_on_fit_end or not lora_layers(pl_module):
            return
        merge_lora(pl_module, unload=True)
        if dequantize_base(pl_module):  # QLoRA: the merged model is full precision, never re-quantized
            rank_zero_info("The 4-bit base was dequantized to float32 for the merge; the merged model is full precision.")
        pl_module.__dict__[_MERGED_ATTR] = self.config
        rank_zero_info("LoRA adapters merged into the base weights; the module holds plain layers again.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Leave the module's own hooks as they were (and no forward hooks of the dead-adapter check)."""
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        for module, name in self._wrapped_hooks:
            module.__dict__.pop(name, None)
        self._wrapped_hooks.clear()
        self._resume_guard.remove()

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the RNG states each epoch's shuffle is drawn from, for a mid-epoch resume."""
        self._resume.on_train_epoch_start(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict()}

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Full (not weights-only) checkpoints: add the data position and RNG states an exact resume needs."""
        checkpoint[CHECKPOINT_RESUME_KEY] = self._resume.state_dict(trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """After the weights are loaded, before loops and optimizers: prepare the exact resume."""
        if CHECKPOINT_RESUME_KEY in checkpoint:
            self._resume.load_state_dict(trainer, checkpoint[CHECKPOINT_RESUME_KEY], checkpoint)

    # -- internals ---------------------------------------------------------------------------------
    def _chain_module_hook(self, pl_module: nn.Module, name: str, after: Callable[..., None]) -> None:
        """Make ``pl_module.<name>(...)`` run the module's own hook, then ``after(pl_module, ...)``."""
        if any(m is pl_module and n == name for m, n in self._wrapped_hooks):
            return
        original = getattr(pl_module, name)

        def chained(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            after(pl_module, *args, **kwargs)
            return out

        pl_module.__dict__[name] = chained
        self._wrapped_hooks.append((pl_module, name))

    def _install_checkpoint_io(self, trainer: pl.Trainer) -> None:
        """Atomic checkpoint writes (unless opted out or the user chose a plugin) and clear read errors."""
        self._resume_guard.install(trainer)
        if not self.atomic_checkpoints or install_atomic_checkpoint_io(trainer.strategy):
            return
        if not self._io_info_logged:
            self._io_info_logged = True
            rank_zero_info(
                f"LoRACallback: checkpoints are written by your {type(trainer.strategy.checkpoint_io).__name__}, "
                "not by AtomicCheckpointIO (atomic_checkpoints applies to Lightning's default checkpoint IO only)."
            )

    def _ensure_injected(self, pl_module: nn.Module) -> None:
        existing = lora_config_of(pl_module)
        if lora_layers(pl_module):
            if existing != self.config:
                raise ValueError(
                    f"{type(pl_module).__name__} already holds LoRA adapters with a different config "
                    f"({existing!r}) than this callback ({self.config!r}). Use one LoRACallback, or call "
                    "`unload_lora(model)` first."
                )
            return
        self._check_has_parameters(pl_module)
        if has_sharded_parameters(pl_module):
            raise ValueError(
                f"{type(pl_module).__name__}'s parameters were sharded (fully_shard) before LoRACallback could inject "
                "adapters, so FSDP would not manage them. Build the model in `__init__` (the callback then injects "
                "before `configure_model`), or call `lightning_lora.inject_lora(self, callback.config)` in "
                "`configure_model` before `fully_shard`."
            )
        skip = find_modules_to_save(pl_module, self.config)
        quantize_for_fit(pl_module, self._trainer, self.quantize_base, self.double_quant, self.compute_dtype, skip)
        inject_lora(pl_module, self.config)
        pl_module.__dict__.pop(_MERGED_ATTR, None)
        rank_zero_info(str(summarize_lora(pl_module)))
        self._warn_frozen_batchnorm(pl_module)

    @staticmethod
    def _check_has_parameters(pl_module: nn.Module) -> None:
        if not any(True for _ in pl_module.parameters()):
            raise ValueError(
                f"LoRACallback is attached to {type(pl_module).__name__}, which has no parameters. Create the model "
                "in `__init__` or in `configure_model` before training."
            )

    @staticmethod
    def _warn_frozen_batchnorm(pl_module: nn.Module) -> None:
        inside_saved = {id(m) for w in pl_module.modules() if isinstance(w, ModulesToSave) for m in w.modules()}
        names = [
            name
            for name, m in pl_module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and id(m) not in inside_saved
        ]
        if names:
            rank_zero_warn(
                f"Frozen BatchNorm layers ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) still update "
                "their running statistics in train mode, and adapter-only checkpoints do not store them. Add them to "
                "`modules_to_save` or keep them in eval mode."
            )

    def _configure_optimizers(self) -> Any:
        assert self._trainer is not None and self.optimizer is not None
        pl_module = self._trainer.lightning_module
        optimizer = build_optimizer(pl_module, self.optimizer, self.lora_b_lr_ratio)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def _make_checkpoint_adapter_only(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {key: state[key] for key in adapter_state_keys(pl_module) if key in state}
        checkpoint[CHECKPOINT_CONFIG_KEY] = self.config.to_dict()
        checkpoint[FINGERPRINT_KEY] = base_fingerprint(pl_module)

    def _complete_adapter_only_checkpoint(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        source = f"checkpoint {self._trainer.ckpt_path}" if self._trainer and self._trainer.ckpt_path else "checkpoint"
        saved = checkpoint.get(CHECKPOINT_CONFIG_KEY)
        try:
            check_adapter_state(pl_module, checkpoint["state_dict"], source)
        except ValueError as err:
            if saved is not None:
                diff = self.config.differences(LoRAConfig.from_dict(saved))
                if diff:
                    detail = ", ".join(f"{k}={theirs!r} there vs {mine!r} here" for k, (mine, theirs) in diff.items())
                    raise ValueError(f"{err}\nThe {source} was written with other LoRA settings: {detail}.") from None
            raise
        path = self._trainer.ckpt_path if self._trainer and self._trainer.ckpt_path else "checkpoint"
        check_fingerprint(pl_module, checkpoint.get(FINGERPRINT_KEY), path, self.check_base_fingerprint)
        # Lightning loads strictly next: complete the adapter-only state with the model's own base weights.
        full = loadable_state_dict(pl_module)
        full.update(checkpoint["state_dict"])
        checkpoint["state_dict"] = full
