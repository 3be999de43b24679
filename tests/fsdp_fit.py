"""Run by test_fsdp.py as a script: LoRACallback under FSDP2 / FSDP1 on CPU, 2 processes (gloo).

Usage: python tests/fsdp_fit.py OUT_DIR (fsdp2|fsdp1) (sharded|single) (full|resume)
(fsdp1 needs GPUs: PyTorch's FSDP1 refuses CPU-only machines.)

Lightning's launcher re-executes this script for rank 1. Rank 0 writes the final full adapter
state (gathered from the shards) to OUT_DIR/adapters_<phase>.pt and a JSON report of how the
parameters were sharded.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

sys.path.insert(0, str(Path(__file__).parent))
from lora_test_modules import BertClassifier, fit_kwargs, token_loader  # noqa: E402

from lightning_lora import LoRACallback, adapter_state_keys  # noqa: E402
from lightning_lora.strategies import LoRAFSDPStrategy, LoRAModelParallelStrategy  # noqa: E402


class FullyShardedBert(BertClassifier):
    """The FSDP2 recipe: `configure_model` applies `fully_shard` per encoder layer, then to the root."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def strategy(kind: str, layout: str):
    if kind == "fsdp2":
        return LoRAModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                         save_distributed_checkpoint=layout == "sharded")  # fmt: skip
    from transformers.models.bert.modeling_bert import BertLayer

    return LoRAFSDPStrategy(auto_wrap_policy={BertLayer})


def main(out: Path, kind: str, layout: str, phase: str) -> None:
    module = FullyShardedBert() if kind == "fsdp2" else BertClassifier()
    lora = LoRACallback(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        merge_on_fit_end=False)  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(callbacks=[lora, ckpt], **fit_kwargs(
        out, strategy=strategy(kind, layout), accelerator="cuda" if kind == "fsdp1" else "cpu", devices=2, max_steps=6))
    ckpt_path = out / "ckpt" / "epoch=0-step=3.ckpt" if phase == "resume" else None
    trainer.fit(module, token_loader(n=48, batch_size=4), ckpt_path=ckpt_path)
    keys = adapter_state_keys(module)
    full = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "_forward_module." if kind == "fsdp1" else ""
    full = {k.removeprefix(prefix): v for k, v in full.items()}
    if trainer.global_rank == 0:
        torch.save({k: full[k] for k in keys}, out / f"adapters_{phase}.pt")
        local = {n: [list(getattr(p, "to_local", lambda: p)().shape), list(p.shape), p.requires_grad]
                 for n, p in trainer.strategy.model.named_parameters()}  # fmt: skip
        (out / f"params_{phase}.json").write_text(json.dumps(local))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
