"""The sampler: seeded per request (not per batch, shard or resume), resumable, multi-rank, two engines.

Most tests drive `run_sampler` with a stub engine whose samples are a function of (seed, key, j), so
what is checked is the bookkeeping: which requests are asked, what the files hold after a kill, a torn
line, two ranks. The engines are checked on the tiny model: transformers' greedy samples equal
`transformers_answers`, its seeded samples repeat across runs and batch sizes, and vLLM's greedy samples
equal transformers' (the two engines' random streams differ, so only greedy can be compared).
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vlmtune.train.runtime.eval_engines import EvalItem, eval_items, transformers_answers
from vlmtune.train.runtime.sampler import (
    MERGED,
    Sample,
    SampleRequest,
    SamplingSettings,
    SeededSampling,
    TransformersEngine,
    prompt_of,
    request_seed,
    run_sampler,
)


def item(i: int, images: int = 1) -> EvalItem:
    content = [{"type": "image"}] * images + [{"type": "text", "text": f"question {i}?"}]
    return EvalItem(
        f"q.jsonl:{i}", "q", "a", [{"role": "user", "content": content}], [f"/img/{i}.png"] * images
    )


def requests(n: int) -> list[SampleRequest]:
    return [SampleRequest(f"q:{i}", item(i)) for i in range(n)]


class StubEngine:
    """Samples named after their seed; ``fail_after`` raises after that many requests (a kill)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.asked: list[str] = []
        self.fail_after = fail_after

    def __call__(self, reqs: list[SampleRequest], settings: SamplingSettings):
        for r in reqs:
            if self.fail_after is not None and len(self.asked) == self.fail_after:
                raise KeyboardInterrupt("killed")
            self.asked.append(r.key)
            base = request_seed(settings.seed, r.key)
            yield [Sample(f"{r.key}/{base + j}", "stop", j + 1) for j in range(settings.n)]


SETTINGS = SamplingSettings(n=3, temperature=1.0, max_new_tokens=4, seed=5)


def test_seeded_sampling_draws_from_the_warped_distribution_row_by_row():
    """Gumbel-max with one generator per row: frequencies = softmax(logits / T) (top-p: renormalised over
    the nucleus, nothing outside it), and a row's draw does not depend on the rows beside it."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    rows = 4000
    for top_p in (1.0, 0.8):
        sampling = SeededSampling(list(range(rows)), temperature=0.7, top_p=top_p)
        draws = sampling(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1)).argmax(-1)
        probs = torch.softmax(logits / 0.7, -1).double()
        if top_p < 1:  # the smallest set of top tokens whose mass reaches top_p
            keep = (probs.cumsum(-1) - probs) < top_p
            probs = torch.where(keep, probs, 0.0) / probs[keep].sum()
            assert keep.tolist() == [True, True, False, False, False]
        freq = torch.bincount(draws, minlength=5).double() / rows
        assert (freq - probs).abs().max() < 0.03, (freq, probs)  # 4 sigma at 4000 draws
        assert (freq[probs == 0] == 0).all()
        alone = SeededSampling(list(range(7)), 0.7, top_p)(
            torch.zeros(7, 1, dtype=torch.long), logits.repeat(7, 1)
        )
        assert torch.equal(alone.argmax(-1), draws[:7])


def test_request_seed_is_a_function_of_seed_and_key():
    assert (
        request_seed(0, "a:1") == request_seed(0, "a:1") != request_seed(1, "a:1") != request_seed(0, "a:2")
    )
    assert 0 <= request_seed(123, "x") < 2**62


def test_prompt_drops_image_parts_and_continues_the_prefix():
    r = SampleRequest("k", item(0, images=2), prefix="The answer", drop_images=True)
    messages, images = prompt_of(r)
    assert images == [] and all(p["type"] != "image" for m in messages for p in m["content"])
    assert messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": "The answer"}]}
    assert prompt_of(SampleRequest("k", item(0)))[1] == ["/img/0.png"]


def test_resume_after_a_kill_and_a_torn_line_equals_an_uninterrupted_run(tmp_path):
    reqs = requests(7)
    whole = run_sampler(reqs, SETTINGS, StubEngine(), tmp_path / "whole")
    killed = StubEngine(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_sampler(reqs, SETTINGS, killed, tmp_path / "resumed")
    shard = tmp_path / "resumed" / "samples.rank0.jsonl"
    assert len(shard.read_text().splitlines()) == 3  # each finished request was on disk
    with open(shard, "a") as f:
        f.write('{"key": "q:3", "settings": {"n": 3')  # a write cut short by the kill
    again = StubEngine()
    resumed = run_sampler(reqs, SETTINGS, again, tmp_path / "resumed")
    assert again.asked == ["q:3", "q:4", "q:5", "q:6"]
    assert resumed == whole
    assert (tmp_path / "resumed" / MERGED).read_bytes() == (tmp_path / "whole" / MERGED).read_bytes()
    assert [json.loads(line)["key"] for line in (tmp_path / "whole" / MERGED).read_text().splitlines()] == [
        r.key for r in reqs
    ]
    done = StubEngine()
    run_sampler(reqs, SETTINGS, done, tmp_path / "resumed")
    assert done.asked == []  # nothing left to do


def test_two_ranks_by_flags_merge_to_the_one_rank_file(tmp_path):
    reqs = requests(7)
    run_sampler(reqs, SETTINGS, StubEngine(), tmp_path / "one")
    engines = [StubEngine(), StubEngine()]
    results: dict[int, dict] = {}

    def rank(r: int) -> None:
        results[r] = run_sampler(
            reqs, SETTINGS, engines[r], tmp_path / "two", rank=r, world_size=2, poll_s=0.02, wait_timeout=60
        )

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engines[0].asked == ["q:0", "q:2", "q:4", "q:6"] and engines[1].asked == ["q:1", "q:3", "q:5"]
    assert results[0] == results[1]  # every rank gets every request's samples
    assert (tmp_path / "two" / MERGED).read_bytes() == (tmp_path / "one" / MERGED).read_bytes()
    # a rerun on one rank finds everything done, whichever rank sampled it
    rerun = StubEngine()
    assert run_sampler(reqs, SETTINGS, rerun, tmp_path / "two") == results[0] and rerun.asked == []


def _gloo_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        run_sampler(requests(5), SETTINGS, StubEngine(), out, rank=rank, world_size=2)
    finally:
        dist.destroy_process_group()


def test_two_ranks_under_gloo_merge_to_the_one_rank_file(tmp_path):
    import torch.multiprocessing as mp

    run_sampler(requests(5), SETTINGS, StubEngine(), tmp_path / "one")
    mp.spawn(_gloo_rank, args=(str(tmp_path / "store"), str(tmp_path / "two")), nprocs=2)
    assert (tmp_path / "two" / MERGED).read_bytes() == (tmp_path / "one" / MERGED).read_bytes()
    shards = sorted(p.name for p in (tmp_path / "two").glob("samples.rank*.jsonl"))
    assert shards == ["samples.rank0.jsonl", "samples.rank1.jsonl"]


def test_other_settings_or_repeated_keys_are_refused(tmp_path):
    run_sampler(requests(2), SETTINGS, StubEngine(), tmp_path)
    with pytest.raises(ValueError, match="sampled with"):
        run_sampler(requests(2), replace(SETTINGS, temperature=0.5), StubEngine(), tmp_path)
    with pytest.raises(ValueError, match="appears twice"):
        run_sampler(requests(2) * 2, SETTINGS, StubEngine(), tmp_path / "dup")


# ---------------------------------------------------------------- the engines on the tiny model


@pytest.fixture(scope="module")
def tiny_items(tmp_path_factory) -> list[EvalItem]:
    """Five held-out questions of the demo data (one and two images), read as `vlmtune eval` reads them."""
    from vlmtune.data.synthetic import generate_sft_dataset

    root = tmp_path_factory.mktemp("sampler_data")
    generate_sft_dataset(root, num_train=1, num_eval=30, task_weights={"color": 0.5, "multi_image": 0.5})
    items = eval_items(str(root / "meta_eval.json"), 0, None)
    singles = [i for i in items if len(i.images) == 1][:3]
    return [*singles, *[i for i in items if len(i.images) == 2][:2]]


def tiny_requests(items: list[EvalItem]) -> list[SampleRequest]:
    """The questions, and the first one continued from a prefix without its image."""
    first = items[0]
    return [
        *[SampleRequest(i.source, i) for i in items],
        SampleRequest(first.source + "#ntp", first, prefix="The shape is", drop_images=True),
    ]


def texts(result: dict[str, list[Sample]]) -> dict[str, list[str]]:
    return {k: [s.text for s in v] for k, v in result.items()}


def test_transformers_engine_greedy_is_transformers_answers_and_seeded_samples_repeat(
    tiny_model_dir, tiny_items, tmp_path
):
    """The one end-to-end test: greedy through the sampler (batched, 3 requests per generate, mixed
    image/no-image rows) = `transformers_answers` one at a time; seeded samples at temperature 1 are
    the same in two runs and at batch sizes 1 and 4, differ across j and across seeds."""
    reqs = tiny_requests(tiny_items)
    engine = TransformersEngine(tiny_model_dir, batch_size=3)
    greedy = SamplingSettings(n=2, temperature=0.0, max_new_tokens=6)
    got = run_sampler(reqs, greedy, engine, tmp_path / "greedy")
    expected = transformers_answers(str(tiny_model_dir), tiny_items, max_new_tokens=6)
    assert [got[i.source][0].text for i in tiny_items] == expected
    assert all(v[0] == v[1] for v in got.values())  # greedy: one sample, repeated
    assert all(s.finish_reason == "length" and s.num_tokens == 6 for v in got.values() for s in v)
    text, _ = engine._prompt(reqs[-1])
    assert "<IMG_CONTEXT>" not in text and text.endswith("<|im_start|>assistant\nThe shape is")

    sampling = SamplingSettings(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)
    runs = []
    for name, batch in (("a", 4), ("b", 4), ("c", 1)):
        engine.batch_size = batch
        runs.append(texts(run_sampler(reqs, sampling, engine, tmp_path / name)))
    assert runs[0] == runs[1] == runs[2]
    assert all(len(set(v)) == 3 for v in runs[0].values())  # three draws, not one repeated
    engine.batch_size = 4
    other = texts(run_sampler(reqs, replace(sampling, seed=12), engine, tmp_path / "d"))
    assert all(other[k] != runs[0][k] for k in other)


@pytest.mark.slow  # one vLLM start on the CPU backend: 60-100 s on 2 loaded cores
def test_vllm_engine_greedy_equals_transformers_engine(tiny_model_dir, tiny_items, tmp_path):
    """Both engines on a copy of the tiny export whose generation config also stops at a token the
    random model emits, so stop handling and the token count (stop token included) are compared too."""
    from vlmtune.train.runtime.eval_engines import vllm_missing_message, vllm_python
    from vlmtune.train.runtime.sampler import VLLMEngine

    if vllm_python() is None:
        pytest.skip(vllm_missing_message())
    reqs = tiny_requests(tiny_items)
    greedy = SamplingSettings(n=2, temperature=0.0, max_new_tokens=8)
    plain = run_sampler(reqs, greedy, TransformersEngine(tiny_model_dir, batch_size=3), tmp_path / "plain")
    engine = TransformersEngine(tiny_model_dir)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = engine.processor.tokenizer(plain[reqs[0].key][0].text, add_special_tokens=False)["input_ids"]
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], first[2]]  # the first answer's third token
    (model / "generation_config.json").write_text(json.dumps(config))

    ours = run_sampler(reqs, greedy, TransformersEngine(model, batch_size=3), tmp_path / "tf")
    theirs = run_sampler(reqs, greedy, VLLMEngine(model), tmp_path / "vllm")
    stopped = ours[reqs[0].key][0]
    assert stopped.finish_reason == "stop" and stopped.num_tokens <= 3
    assert plain[reqs[0].key][0].text.startswith(stopped.text)  # the stop token's text not included
    assert theirs == ours
    assert Path(tmp_path / "vllm" / MERGED).is_file()
