"""Run by test_zero_init under torchrun (2 ranks, gloo): builds the tiny model under ZeRO-3 the way the
runner does (train.engine.partitioned_construction) and records, per rank, what it holds and what the
gathered weights are, for the test to compare with the checkpoint and with an ordinary build."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vlmtune.train.model.build import ModelConfig, build_model, count_parameters  # noqa: E402
from vlmtune.train.runtime.config import DeepSpeedConfig, OptimConfig, TrainConfig  # noqa: E402
from vlmtune.train.runtime.engine import (  # noqa: E402
    build_ds_config,
    init_distributed,
    param_groups,
    partitioned_construction,
)


def gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def main(ckpt: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    rank, world = init_distributed()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ds = DeepSpeedConfig(zero_stage=3, stage3_param_persistence_threshold=0)
    ds_config = build_ds_config(ds, TrainConfig(), OptimConfig(), world)
    result: dict = {"rank": rank, "world": world}
    with partitioned_construction(ds_config) as partitioned:
        result["partitioned"] = partitioned
        loaded = build_model(ModelConfig(pretrained=str(ckpt)), tokenizer)
        result["counts"] = count_parameters(loaded)
        result["local_numel"] = sum(p.numel() for p in loaded.parameters())
        result["held_numel"] = sum(p.ds_tensor.numel() for p in loaded.parameters())
        names = {id(p): n for n, p in loaded.named_parameters()}
        result["no_decay"] = sorted(names[id(p)] for p in param_groups(loaded, 0.1)[1]["params"])
        weights = gathered(loaded)
        random_cfg = ModelConfig(**{k: v for k, v in _tiny_shapes(ckpt).items()})
        torch.manual_seed(3)
        first = gathered(build_model(random_cfg, tokenizer))
        torch.manual_seed(3)
        second = gathered(build_model(random_cfg, tokenizer))
    result["random_rebuild_max_diff"] = max((first[k] - second[k]).abs().max().item() for k in first)
    result["random_std"] = max(v.float().std().item() for v in first.values() if v.numel() > 1)
    if rank == 0:
        torch.save(weights, out / "gathered.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def _tiny_shapes(ckpt: Path) -> dict:
    """The tiny checkpoint's shapes as a random-init ModelConfig (from configs/model/tiny.yaml)."""
    from omegaconf import OmegaConf

    tiny = OmegaConf.load(Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml")
    tiny = OmegaConf.to_container(tiny)
    return {k: v for k, v in tiny.items() if k in ModelConfig.__dataclass_fields__ and k != "pretrained"}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
