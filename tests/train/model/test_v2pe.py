"""V2PE: exact ids on hand-built layouts, δ = 1 is the plain path, packing = unpacking, MPO layouts agree,
generation = full-forward argmax, δ survives export, bad δ refused at start, the sweep preset and report."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.train.helpers import make_sample, tiny_model, tiny_tokenizer
from tests.train.objectives.test_mpo import make_pairs
from vlmtune.data.collate import collate_packed, collate_padded, collate_pairs
from vlmtune.data.pairs import tree_position_ids
from vlmtune.data.token_weights import loss_normaliser
from vlmtune.train.model.attention import sample_bounds
from vlmtune.train.model.forward import forward_logits
from vlmtune.train.model.v2pe import (
    V2PEConfig,
    apply_v2pe_config,
    packed_causal_mask,
    prompt_position_ids,
    v2pe_position_ids,
)
from vlmtune.train.objectives.losses import weighted_nll_sum
from vlmtune.train.objectives.mpo import response_logps

DELTA = 0.25
SHAPES = [(1, 3, 5, 4), (0, 0, 9, 6), (2, 1, 3, 2), (1, 1, 7, 3)]  # images, tiles/image, prompt, answer


def recurrence(visual: list[bool], delta: float) -> list[Fraction]:
    """The paper's definition, by hand: p_0 = 0, then +delta for an image token, +1 for text."""
    d = Fraction(delta)
    out = [Fraction(0)]
    for v in visual[1:]:
        out.append(out[-1] + (d if v else 1))
    return out


def ids(visual: list[int], positions: list[int] | None = None, delta: float = DELTA) -> list[float]:
    pos = torch.tensor([positions if positions is not None else list(range(len(visual)))])
    return v2pe_position_ids(pos, torch.tensor([visual]).bool(), delta)[0].tolist()


# --- the ids, exactly ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "visual",
    [
        [0, 0, 0, 0, 0],  # text only
        [0, 0, 1, 1, 1, 1, 0, 0],  # <img> IMG*4 </img> text
        [0, 1, 1, 0, 0, 1, 1, 1, 0, 1],  # two images
        [1, 1, 0, 0],  # first token an image token: p_0 = 0 whatever it is
    ],
)
@pytest.mark.parametrize("delta", [1.0, 0.5, 0.25, 1 / 256])
def test_ids_follow_the_recurrence(visual, delta):
    assert ids(visual, delta=delta) == [float(x) for x in recurrence([bool(v) for v in visual], delta)]


def test_ids_by_hand():
    # <img> IMG IMG </img> a b: 0, .25, .5, 1.5, 2.5, 3.5
    assert ids([0, 1, 1, 0, 0, 0]) == [0, 0.25, 0.5, 1.5, 2.5, 3.5]


def test_packed_samples_restart_and_count_their_own_images():
    visual = [[0, 1, 1, 0, 0], [0, 0, 0], [0, 1, 1, 1, 0, 1, 0]]
    positions = [p for v in visual for p in range(len(v))]
    expected = [float(x) for v in visual for x in recurrence([bool(b) for b in v], DELTA)]
    assert ids([b for v in visual for b in v], positions) == expected


def test_mpo_tree_branches_equal_their_own_sequences():
    p_vis = [0, 1, 1, 1, 0, 0]  # prompt with an image; responses are text
    c, r = 3, 5
    positions = tree_position_ids(len(p_vis), c, r).tolist()
    got = ids(p_vis + [0] * (c + r), positions)
    chosen = recurrence([bool(v) for v in p_vis] + [False] * c, DELTA)
    rejected = recurrence([bool(v) for v in p_vis] + [False] * r, DELTA)
    assert got == [float(x) for x in chosen + rejected[len(p_vis) :]]


def test_delta_one_returns_the_ids_themselves():
    pos = torch.arange(7)[None]
    assert v2pe_position_ids(pos, torch.ones(1, 7, dtype=torch.bool), 1.0) is pos


def test_per_token_delta_tensor():
    # a delta per token (two packed samples, each its own delta) = each sample alone with its delta
    vis = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0]]).bool()
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    delta = torch.tensor([[0.5] * 4 + [0.125] * 4])
    assert v2pe_position_ids(pos, vis, delta)[0].tolist() == ids([0, 1, 1, 0], delta=0.5) + ids(
        [0, 1, 1, 0], delta=0.125
    )


def test_sample_bounds_and_mask_hold_for_v2pe_ids():
    from transformers.masking_utils import find_packed_sequence_indices

    from vlmtune.train.model.attention_varlen import cu_seqlens

    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]])
    vis = torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0]]).bool()
    v2pe = v2pe_position_ids(pos, vis, 1 / 256)
    assert sample_bounds(v2pe[0]) == sample_bounds(pos[0]) == [0, 4, 7, 12]
    assert cu_seqlens(v2pe)[0].tolist() == [0, 4, 7, 12]
    assert torch.equal(packed_causal_mask(v2pe), packed_causal_mask(pos))
    # transformers' own rule (diff != 1) would cut a sample at every image token: why sdpa gets a mask
    assert find_packed_sequence_indices(v2pe)[0, -1] > 2


# --- the model -----------------------------------------------------------------------------------------


def _model(attn: str, delta: float | torch.Tensor | None = DELTA, seed: int = 0):
    model = tiny_model(seed=seed, attn_implementation=attn).eval()
    if delta is not None:
        model.config.v2pe_delta = delta
    return model


def _logits(model, batch):
    return forward_logits(model, batch, torch.arange(batch["input_ids"].shape[1]))


def test_delta_one_through_the_v2pe_path_gives_identical_logits():
    plain = _model("packed_sdpa", delta=None)
    samples = [make_sample(plain, *shape, seed=i) for i, shape in enumerate(SHAPES)]
    batch = collate_packed(samples, "square")
    reference = _logits(plain, batch)
    plain.config.v2pe_delta = 1.0
    assert torch.equal(_logits(plain, batch), reference)
    # the formula itself at δ = 1 (a δ tensor skips the shortcut): float ids, bit-identical logits
    vis = batch["input_ids"] == plain.config.image_token_id
    ones = v2pe_position_ids(batch["position_ids"], vis, torch.ones(()))
    assert ones.dtype == torch.float32 and torch.equal(ones, batch["position_ids"].float())
    assert torch.equal(_logits(plain, {**batch, "position_ids": ones}), reference)
    plain.config.v2pe_delta = DELTA
    assert not torch.allclose(_logits(plain, batch), reference, atol=1e-3)  # and V2PE does change them


@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa", "eager"])
def test_packed_equals_unpacked_with_v2pe(attn):
    model = _model(attn)
    samples = [make_sample(model, *shape, seed=i) for i, shape in enumerate(SHAPES)]
    packed = collate_packed(samples, "square")
    logits_p = _logits(model, packed)
    z = loss_normaliser(packed["supervised_counts"], "square")
    loss_p = weighted_nll_sum(
        logits_p.flatten(0, 1), packed["targets"].flatten(), packed["weights"].flatten()
    )
    loss_u, offset = torch.zeros(()), 0
    for s in samples:
        single = collate_packed([s], "square")
        logits = _logits(model, single)
        n = len(s["input_ids"])
        torch.testing.assert_close(logits_p[0, offset : offset + n], logits[0], rtol=1e-4, atol=1e-5)
        offset += n
        loss_u = loss_u + weighted_nll_sum(
            logits.flatten(0, 1), single["targets"].flatten(), single["weights"].flatten()
        )
    torch.testing.assert_close(loss_p / z, loss_u / z, rtol=1e-5, atol=1e-6)
    # padded rows (right padding, a 2D mask) give the same loss too
    padded = collate_padded(samples, "square", pad_token_id=0)
    logits_pad = _logits(model, padded)
    loss_pad = weighted_nll_sum(
        logits_pad.flatten(0, 1), padded["targets"].flatten(), padded["weights"].flatten()
    )
    torch.testing.assert_close(loss_pad / z, loss_p / z, rtol=1e-5, atol=1e-6)


def test_sdpa_without_the_block_mask_would_leak():
    """The control: transformers' own packed mask on V2PE ids differs from the per-sample run."""
    model = _model("sdpa")
    samples = [make_sample(model, *shape, seed=i) for i, shape in enumerate(SHAPES[:2])]
    packed = collate_packed(samples, "square")
    single = _logits(model, collate_packed(samples[:1], "square"))
    vis = packed["input_ids"] == model.config.image_token_id
    out = model(
        input_ids=packed["input_ids"],
        pixel_values=samples[0]["pixel_values"],
        position_ids=v2pe_position_ids(packed["position_ids"], vis, DELTA),
        use_cache=False,  # (with a cache transformers builds no packed mask at all)
    ).logits
    n = single.shape[1]
    assert not torch.allclose(out[0, :n], single[0], atol=1e-3)  # text after the image lost its prompt


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_mpo_tree_and_separate_layouts_agree_with_v2pe(attn):
    model = _model(attn)
    pairs = make_pairs(model)
    tree, _, _ = response_logps(model, collate_pairs(pairs, "tree", "token"))
    separate, _, _ = response_logps(model, collate_pairs(pairs, "separate", "token"))
    torch.testing.assert_close(tree, separate, rtol=1e-5, atol=1e-5)
    # each side as its own sequence, V2PE ids by the recurrence
    ctx = model.config.image_token_id
    for i, pair in enumerate(pairs):
        for b, key in enumerate(("chosen", "rejected")):
            seq = torch.cat([pair["prompt_ids"], pair[f"{key}_ids"]])[None]
            vis = [bool(t == ctx) for t in seq[0]]
            pos = torch.tensor([[float(x) for x in recurrence(vis, DELTA)]])
            kwargs = {"pixel_values": pair["pixel_values"]} if pair["num_tiles"] else {}
            logits = model(input_ids=seq, position_ids=pos, **kwargs).logits[0].float()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, seq[0, 1:, None])[:, 0]
            torch.testing.assert_close(
                tree[i, b], logp[len(pair["prompt_ids"]) - 1 :].sum(), rtol=1e-4, atol=1e-4
            )


def _prompt(model, n_images: int, text: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = make_sample(model, n_images, 1, text, 0, seed=seed)
    return s["input_ids"][:-1], s["pixel_values"]


def _full_forward_logits(model, seq: torch.Tensor, pixels: torch.Tensor, delta: float) -> torch.Tensor:
    """Last-position logits after every prefix longer than the prompt, no cache: full forwards with the
    whole sequence's V2PE ids by the recurrence."""
    ctx = model.config.image_token_id
    pos = torch.tensor([[float(x) for x in recurrence([bool(t == ctx) for t in seq], delta)]])
    kwargs = {"pixel_values": pixels} if len(pixels) else {}
    return model(input_ids=seq[None], position_ids=pos, use_cache=False, **kwargs).logits[0]


def test_generation_equals_full_forward_argmax(monkeypatch):
    from vlmtune.train.runtime.evaluate import generate_answers

    model = _model("packed_sdpa", seed=3)
    tok = tiny_tokenizer()
    prompts = [_prompt(model, 2, 3, seed=0), _prompt(model, 0, 9, seed=1), _prompt(model, 1, 5, seed=2)]
    steps = 6
    width = max(len(p) for p, _ in prompts)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, (p, _) in enumerate(prompts):
        input_ids[i, width - len(p) :], attention[i, width - len(p) :] = p, 1
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=prompt_position_ids(input_ids, attention, model.config),
        pixel_values=torch.cat([px for _, px in prompts]),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    generated = out.sequences[:, width:]
    cached = torch.stack(out.logits, 1)  # [B, steps, V]: what the cached decoding saw at each step
    for i, (p, px) in enumerate(prompts):
        full = _full_forward_logits(model, torch.cat([p, generated[i]]), px, DELTA)[len(p) - 1 : -1]
        torch.testing.assert_close(cached[i], full, rtol=1e-4, atol=1e-5)
        assert torch.equal(full.argmax(-1), generated[i])
        if len(px):  # the control: standard positions give other logits
            plain = _full_forward_logits(model, torch.cat([p, generated[i]]), px, 1.0)[len(p) - 1 : -1]
            assert not torch.allclose(cached[i], plain, atol=1e-3)
    # vlmtune's eval path hands generate the same V2PE ids and decodes the same tokens
    seen = {}
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or real_generate(**kw))
    samples = [{"pixel_values": px, "num_tiles": len(px)} for _, px in prompts]
    answers = generate_answers(
        model, tok, samples, [p for p, _ in prompts], blank=False, max_new_tokens=steps, synced=False
    )
    assert torch.equal(seen["position_ids"], prompt_position_ids(input_ids, attention, model.config))
    assert seen["position_ids"].dtype == torch.float32  # fractional: V2PE, not the standard ids
    end = tok.convert_tokens_to_ids("<|im_end|>")
    cut = [g[: g.index(end)] if end in g else g for g in generated.tolist()]
    assert answers == [tok.decode(c, skip_special_tokens=True) for c in cut]


def test_export_and_load_keep_delta_and_logits(tmp_path):
    from vlmtune.train.runtime.export import export_hf, load_trained

    model = _model("packed_sdpa")
    samples = [make_sample(model, *shape, seed=i) for i, shape in enumerate(SHAPES)]
    batch = collate_packed(samples, "square")
    export_hf(model, tiny_tokenizer(), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["v2pe_delta"] == DELTA
    loaded = load_trained(tmp_path / "hf").eval()
    loaded.config._attn_implementation = "packed_sdpa"
    assert loaded.config.v2pe_delta == DELTA
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)


def test_lora_adapter_export_keeps_delta(tmp_path):
    from tests.train.helpers import tiny_model_config
    from vlmtune.train.model.build import build_model
    from vlmtune.train.model.lora import LoRAConfig, LoRAPartConfig
    from vlmtune.train.runtime.export import export_adapter, load_trained

    _model("packed_sdpa", delta=None).save_pretrained(tmp_path / "base")
    lora = LoRAConfig(llm=LoRAPartConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"]))
    model = build_model(tiny_model_config(pretrained=str(tmp_path / "base")), tiny_tokenizer(), lora)
    apply_v2pe_config(model, V2PEConfig(delta=DELTA))
    export_adapter(model, tiny_tokenizer(), tmp_path / "adapter")
    loaded = load_trained(tmp_path / "adapter", str(tmp_path / "base"))
    assert loaded.get_base_model().config.v2pe_delta == DELTA


# --- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [0.0, -0.5, 1.5])
def test_bad_delta_refused_at_start(delta):
    from vlmtune.configs import CONFIG_DIR
    from vlmtune.train.runtime.config import register_schemas

    with pytest.raises(ValueError, match=r"v2pe.delta.*\(0, 1\]"):
        V2PEConfig(delta=delta)
    register_schemas()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("sft", overrides=[f"v2pe.delta={delta}"])
    with pytest.raises(ValueError, match=r"v2pe.delta"):
        OmegaConf.to_object(cfg)


def test_apply_sets_the_config_and_refuses_other_attention():
    model = _model("packed_sdpa", delta=0.5)
    assert apply_v2pe_config(model, V2PEConfig()) == 0.5  # None keeps the checkpoint's own
    assert apply_v2pe_config(model, V2PEConfig(delta=0.125)) == 0.125 == model.config.v2pe_delta
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="flex_attention"):
        apply_v2pe_config(model, V2PEConfig(delta=0.5))
    assert apply_v2pe_config(model, V2PEConfig(delta=1.0)) == 1.0  # standard positions: any attention


def test_sweep_preset_and_report(tmp_path):
    from vlmtune.configs import CONFIG_DIR
    from vlmtune.train.commands.report import main as report_main
    from vlmtune.train.runtime.config import register_schemas

    register_schemas()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("sft", overrides=["experiment=v2pe_sweep"], return_hydra_config=True)
    deltas = [float(x) for x in cfg.hydra.sweeper.params["v2pe.delta"].split(",")]
    assert deltas == [2.0**-k for k in range(9)]  # 1 ... 1/256, the model card's ablation
    for i, (delta, acc) in enumerate([(1.0, 0.5), (0.25, 0.75)]):
        run = tmp_path / str(i)
        run.mkdir()
        OmegaConf.save(
            OmegaConf.create({"v2pe": {"delta": delta}, "train": {"output_dir": str(run)}}),
            run / "config.yaml",
        )
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0 - acc}) + "\n")
        (run / "eval.json").write_text(json.dumps({"accuracy": acc, "blank_image_accuracy": 0.25}))
    assert report_main([str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    assert "| run | steps | loss | eval_accuracy | eval_blank_accuracy |" in table  # no empty reward columns
    assert "| delta=0.25 | 10 | 0.2500 | 0.7500 | 0.2500 |" in table
