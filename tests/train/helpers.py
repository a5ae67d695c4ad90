"""Test helpers: the tiny model from configs/model/tiny.yaml and hand-built multimodal samples."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf

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
