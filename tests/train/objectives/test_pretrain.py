"""Pre-training mixtures in the trainer: per-dataset token counts, realised shares, text perplexity,
and a two-rank ZeRO-3 run over a text + image mixture with packs that hold no image."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train.e2e import ZERO3, base_overrides, run_sft


def test_dataset_tokens_and_logged_shares_survive_a_resume(tmp_path):
    from vlmtune.train.runtime.config import WandbConfig
    from vlmtune.train.runtime.loop import dataset_tokens
    from vlmtune.train.runtime.metrics import MetricsLogger, dataset_token_totals

    batches = [
        {"datasets": ["text", "vqa", "text"], "sample_tokens": [10, 30, 5]},
        {"datasets": ["vqa"], "sample_tokens": [7]},
        {"num_pairs": 2},  # a batch without per-sample datasets counts nothing
    ]
    assert dataset_tokens(batches, ["vqa", "text", "video"]).tolist() == [37.0, 15.0, 0.0]

    def logger(start: int) -> MetricsLogger:
        return MetricsLogger(
            tmp_path, enabled=True, total_steps=4, start_step=start, wandb_cfg=WandbConfig(), run_config={}
        )

    first = logger(0)
    for step, (t, v) in enumerate([(40, 60), (10, 90), (30, 70)], start=1):
        first.log({"step": step, "tokens": t + v, "tokens/text": t, "tokens/vqa": v})
    first.close()
    resumed = logger(2)  # step 3 is dropped: the resumed state had not seen it
    resumed.log({"step": 3, "tokens/text": 50, "tokens/vqa": 50})
    resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert dataset_token_totals(lines) == {"text": 100, "vqa": 200}
    assert lines[0]["share/text"] == pytest.approx(0.4)
    assert lines[1]["share/text"] == pytest.approx(50 / 200)
    assert lines[2]["share/text"] == pytest.approx(100 / 300)


def test_text_perplexity_equals_the_model_own_loss(tiny_model_dir):
    """Our packed, blank-tile forward against transformers' loss on each text sample alone."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from vlmtune.data.conversation import tokenize_text
    from vlmtune.train.runtime.perplexity import text_perplexity

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = InternVLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    docs = ["I see a red circle. The circle is red.", "Count the blue squares: one, two, three.", "Hi."]
    samples = []
    for d in docs:
        ids, labels = tokenize_text(d, tok, [])
        samples.append({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(0), "num_tiles": 0})
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            out = model(input_ids=s["input_ids"][None], labels=s["labels"][None])
            n = len(s["input_ids"]) - 1  # every next token is a target
            nll += out.loss.item() * n
            count += n
    got = text_perplexity(model, samples, batch_size=2)
    assert got["text_tokens"] == count and got["text_samples"] == 3
    assert got["text_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert got["text_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["text_perplexity"] > 100  # random weights: near the vocabulary size (1483), not a fluke


DATA_CFG = {"max_length": 128, "packing.max_tokens": 128, "train.gradient_accumulation_steps": 2}
STEPS, WEIGHTS = 3, {"text": 0.5, "shapes": 0.5}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    from vlmtune.data.synthetic import generate_sft_dataset, generate_text_corpus
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("pretrain_e2e")
    data = root / "data"
    generate_sft_dataset(data, num_train=64, num_eval=8, seed=1)
    generate_text_corpus(data, num_train=64, num_eval=8, seed=1)
    meta = data / "meta_mix.json"
    meta.write_text(
        json.dumps(
            {
                "text": {"annotation": "text_train.jsonl", "weight": WEIGHTS["text"]},
                "shapes": {"annotation": "train.jsonl", "weight": WEIGHTS["shapes"]},
            }
        )
    )
    (data / "meta_mix_eval.json").write_text(
        json.dumps(
            {"text_eval": {"annotation": "text_eval.jsonl"}, "shapes_eval": {"annotation": "eval.jsonl"}}
        )
    )
    return root, meta, build_tiny_checkpoint(root / "tiny")


def replay_rank_packs(ckpt: Path, meta: Path, rank: int, world: int, n: int) -> list[list[dict]]:
    """The first ``n`` packs rank ``rank`` trains on, rebuilt in-process the way `_train` builds them
    (configs/data/demo.yaml's sample settings, the weights resolved, the rank's shard, best-fit packing)."""
    from transformers import AutoTokenizer

    from vlmtune.data.dataset import DataConfig, SampleProcessor
    from vlmtune.data.meta import load_meta
    from vlmtune.data.mixture import resolve_mixture
    from vlmtune.data.stream import MicroBatchStream
    from vlmtune.train.commands.runner import SampleLoader

    cfg = DataConfig(
        meta_path=str(meta),
        max_length=DATA_CFG["max_length"],
        image_size=56,
        max_dynamic_patch=1,
        min_num_frames=4,
        max_num_frames=8,
        system_prompt=None,
    )
    processor = SampleProcessor(cfg, AutoTokenizer.from_pretrained(ckpt), 16)
    specs, _ = resolve_mixture(load_meta(meta), processor, cfg.seed)
    loader = SampleLoader(processor, specs, cfg.seed)
    stream = MicroBatchStream(
        loader.epoch_size,
        loader,
        rank=rank,
        world_size=world,
        micro_batch_size=1,
        packing=True,
        max_tokens=DATA_CFG["packing.max_tokens"],
        max_tiles=None,
        buffer_size=16,
        on_skip=lambda s: None,
    )
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_two_rank_zero3_mixture_with_imageless_packs_logs_exact_dataset_tokens(mixture):
    """Text and image samples share packs; some packs hold no image at all (replayed below), which
    under ZeRO-3 hangs unless every rank still runs the vision tower. The per-dataset counts in
    metrics.jsonl are exactly the replayed packs' tokens, summed over both ranks, and add up to the
    tokens trained."""
    root, meta, ckpt = mixture
    gas = DATA_CFG["train.gradient_accumulation_steps"]
    packs = {r: replay_rank_packs(ckpt, meta, r, 2, STEPS * gas) for r in (0, 1)}
    imageless = [(r, i) for r in packs for i, p in enumerate(packs[r]) if sum(s["num_tiles"] for s in p) == 0]
    mixed = [p for r in packs for p in packs[r] if len({s["kind"] for s in p}) == 2]
    assert imageless and mixed  # the hazard and the mixing both really occur in this run

    out = root / "zero3_mix"
    extra = {
        "experiment": "pretrain_demo",  # for its eval_data group: text perplexity + exact match
        "prepare_demo": False,
        "eval_data.meta_path": meta.parent / "meta_mix_eval.json",
        "train.eval_before": False,
        "train.max_steps": STEPS,
        "train.save_every": STEPS,
        "train.export": False,
        "data.max_length": DATA_CFG["max_length"],
        "packing.max_tokens": DATA_CFG["packing.max_tokens"],
        "train.gradient_accumulation_steps": gas,
        **ZERO3,
    }
    proc = run_sft(base_overrides(ckpt, meta, out, **extra), nproc=2, timeout=900)
    assert "Traceback" not in proc.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "loss" in m]  # training lines (the last one is followed by the eval's)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    for step, m in enumerate(lines):
        expected = {"text": 0, "shapes": 0}
        for r in (0, 1):
            for pack in packs[r][step * gas : (step + 1) * gas]:
                for s in pack:
                    expected[s["dataset"]] += len(s["input_ids"])
        assert {k: m[f"tokens/{k}"] for k in expected} == expected, step
        assert m["tokens/text"] + m["tokens/shapes"] == m["tokens"]
        assert m["share/text"] + m["share/shapes"] == pytest.approx(1.0)
    # the held-out perplexity computed on two ZeRO-3 shards is the single-process one of the same weights
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from vlmtune.data.dataset import DataConfig, SampleProcessor
    from vlmtune.data.meta import load_meta
    from vlmtune.train.runtime.perplexity import text_perplexity

    results = json.loads((out / "eval.json").read_text())
    model = InternVLForConditionalGeneration.from_pretrained(ckpt)
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=f"step_{STEPS:08d}")
    model.load_state_dict(state, strict=False)
    cfg = DataConfig(meta_path=str(meta), image_size=56, system_prompt=None)
    processor = SampleProcessor(cfg, AutoTokenizer.from_pretrained(ckpt), 16)
    [text_eval] = [s for s in load_meta(meta.parent / "meta_mix_eval.json") if s.name == "text_eval"]
    texts = [processor(text_eval, k, None, False) for k in range(text_eval.num_records)]
    alone = text_perplexity(model.eval(), texts)
    assert results["text_tokens"] == alone["text_tokens"] and results["text_samples"] == 8
    assert results["text_perplexity"] == pytest.approx(alone["text_perplexity"], rel=1e-4)
    assert results["num_samples"] == 8  # the image questions were scored by exact match alongside


@pytest.mark.parametrize("layout", ["tree", "separate"])
def test_pair_batches_count_each_pair_tokens_for_its_dataset(layout):
    """MPO runs log the realised mixture too: a pair takes prompt+chosen+rejected tokens (tree) or
    two prompts (separate), and the per-pair counts add up to the batch's tokens."""
    from vlmtune.data.collate import collate_pairs
    from vlmtune.train.runtime.loop import dataset_tokens

    def pair(p: int, c: int, r: int, dataset: str) -> dict:
        ids = lambda n: torch.arange(n) + 10  # noqa: E731
        return {
            "prompt_ids": ids(p),
            "chosen_ids": ids(c),
            "chosen_labels": ids(c),
            "rejected_ids": ids(r),
            "rejected_labels": ids(r),
            "pixel_values": torch.zeros(0),
            "num_tiles": 0,
            "dataset": dataset,
        }

    batch = collate_pairs([pair(5, 2, 3, "a"), pair(4, 1, 1, "b"), pair(6, 3, 2, "a")], layout, "token")
    by_hand = [5 + 2 + 3, 4 + 1 + 1, 6 + 3 + 2] if layout == "tree" else [2 * 5 + 5, 2 * 4 + 2, 2 * 6 + 5]
    assert batch["sample_tokens"] == by_hand and sum(by_hand) == batch["num_tokens"]
    assert dataset_tokens([batch], ["a", "b"]).tolist() == [by_hand[0] + by_hand[2], by_hand[1]]
