"""Test helpers: the tiny model from configs/model/tiny.yaml and hand-built multimodal samples."""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from tests.train.e2e import free_port
from vlmtune.data.conversation import IGNORE_INDEX
from vlmtune.train.model.build import ModelConfig, build_model, num_image_tokens_per_tile

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@lru_cache(maxsize=1)
def tiny_tokenizer():
    from vlmtune.train.model.tiny import build_tokenizer

    return build_tokenizer()


def tiny_model_config(**overrides) -> ModelConfig:
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(CONFIGS / "model" / "tiny.yaml"), overrides
    )
    return OmegaConf.to_object(cfg)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(**overrides), tiny_tokenizer())


def make_sample(
    model, n_images: int, tiles_per_image: int, prompt_len: int, answer_len: int, seed: int
) -> dict:
    """A sample shaped like the pipeline's: image tokens, a prompt, a supervised answer + <|im_end|>."""
    g = torch.Generator().manual_seed(seed)
    tok = tiny_tokenizer()
    tpt = num_image_tokens_per_tile(model.config)
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    ids = [tok.convert_tokens_to_ids("<|im_start|>")]
    img, end, ctx = (tok.convert_tokens_to_ids(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
    for _ in range(n_images):
        ids += [img] + [ctx] * (tiles_per_image * tpt) + [end]
    ids += torch.randint(300, 1000, (prompt_len,), generator=g).tolist()
    answer = torch.randint(300, 1000, (answer_len,), generator=g).tolist() + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    input_ids = torch.tensor(ids + answer)
    labels = torch.tensor([IGNORE_INDEX] * len(ids) + answer)
    n_tiles = n_images * tiles_per_image
    return {
        "input_ids": input_ids,
        "labels": labels,
        "pixel_values": torch.randn(n_tiles, 3, size, size, generator=g),
        "num_tiles": n_tiles,
    }


def make_pair(
    model, n_images: int, tiles_per_image: int, prompt_len: int, chosen_len: int, rejected_len: int, seed: int
) -> dict:
    """A preference pair shaped like data/pairs.py's: a prompt (image tokens + text), two supervised
    answers each ending in <|im_end|>, and its source ``pairs.jsonl:<seed>`` (the reference caches' key)."""
    end = tiny_tokenizer().convert_tokens_to_ids("<|im_end|>")
    base = make_sample(model, n_images, tiles_per_image, prompt_len, answer_len=0, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    chosen, rejected = (
        torch.cat([torch.randint(300, 1000, (n,), generator=g), torch.tensor([end])])
        for n in (chosen_len, rejected_len)
    )
    return {
        "prompt_ids": base["input_ids"][:-1],  # without the sample's <|im_end|>: the answer follows
        "chosen_ids": chosen,
        "chosen_labels": chosen.clone(),
        "rejected_ids": rejected,
        "rejected_labels": rejected.clone(),
        "pixel_values": base["pixel_values"],
        "num_tiles": base["num_tiles"],
        "source": f"pairs.jsonl:{seed}",
    }


def check_one_step_against_reference(out: Path, script: str, *args: object, timeout: int = 300) -> dict:
    """Run tests/train/``script`` (a ``one_step_versus_reference`` check of dist_grad_check.py, its last
    argument the ZeRO stage) under torchrun on 2 ranks; assert that the weight change is the one-process
    gradient and that the loop logged that gradient's norm and rank 1's text-only micro-batch.
    Returns the step's metrics record. A run past ``timeout`` s (ranks waiting on each other's
    collectives: one takes 15-30 s) is killed with its ranks and fails the test."""
    import json
    import subprocess

    import pytest

    from tests.train.e2e import REPO, sft_env, torchrun

    cmd = torchrun(REPO / "tests" / "train" / script, out, *args)
    log = out / "torchrun.log"  # a file, not a pipe: a rank left behind cannot block the read
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=sft_env(), stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks (each in a session of its own) on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise AssertionError(
                f"{script} {args} hung for {timeout} s (ranks out of step?):\n{log.read_text()[-4000:]}"
            ) from None
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["max_grad"] > 1e-3  # a real gradient, not all zeros
    assert result["max_abs_diff"] < 1e-5 * max(1.0, result["max_grad"])
    if int(args[-1]) == 3:
        assert result["partitioned"]  # no parameter stayed whole on a rank (persistence threshold 0)
    [record] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["grad_norm"] == pytest.approx(result["ref_grad_norm"], rel=1e-5)
    assert record["text_only_micro_batches"] == 1  # rank 1's first micro-batch: no image tile
    return record


@contextmanager
def world_of_one():
    """This process as a plain one-rank `vlmtune sft`/`vlmtune mpo` run (gloo), its environment restored afterwards.
    The process group outlives it (engine.shutdown_distributed keeps it to exit, as a multirun does)."""
    saved = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
    if not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
