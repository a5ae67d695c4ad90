"""One policy sampler: requests in, N samples per request out, for MPO pair making, PRM data and the like.

A request is a chat (`EvalItem`: messages with image parts, the image files) under a stable ``key``,
optionally with an assistant ``prefix`` to continue and its images dropped. What makes it one sampler
and not a loop around ``generate``:

- **Seeded per request.** Sample j of a request is drawn from seed ``request_seed(seed, key) + j`` and
  from nothing else (no global RNG, no position in a batch), so a rerun, another batch size, another
  number of ranks or a resumed run gives the same samples. transformers draws each row with its own
  generator through the Gumbel-max trick (`SeededSampling`); vLLM gets ``SamplingParams(seed=..., n=N)``,
  whose children take ``seed + j``: the same numbers. The two engines' random streams differ, so only
  greedy samples (temperature 0) can agree across engines.
- **Resumable.** Each finished request is appended to ``samples.rank{R}.jsonl`` and fsynced; a restart
  skips the keys any shard already holds (whichever rank or world size wrote them: the samples of a key
  do not depend on that) and cuts a torn last line off its own shard. A shard written with other
  settings is refused.
- **Multi-rank.** Rank r takes requests r, r + W, ...; when every rank is done (a barrier under
  torch.distributed, else waiting for the other shards to hold their keys: ``--rank/--world-size``
  runs coordinated through the shared output folder), every rank reads all shards and rank 0 writes
  ``samples.jsonl`` in request order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vlmtune.train.runtime.eval_engines import (
    EvalItem,
    has_original_config,
    load_images,
    vllm_missing_message,
    vllm_process,
    vllm_python,
)

MERGED = "samples.jsonl"
_SEED_BITS = 62  # vLLM's children add j to the seed: stay clear of int64's top


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample: the chat, and how it is changed before sending.

    ``prefix``: assistant text the samples continue (the chat template's ``continue_final_message``);
    a sample's text is the continuation only. ``drop_images``: the prompt without its image parts.
    """

    key: str
    item: EvalItem
    prefix: str | None = None
    drop_images: bool = False


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; temperature 0 is greedy (one sample, repeated ``n`` times)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling settings out of range: {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Sample:
    """What one sample is: its text, ``"stop"`` (ended itself) or ``"length"`` (hit max_new_tokens),
    and the tokens generated (the stop token included, as vLLM counts)."""

    text: str
    finish_reason: str
    num_tokens: int


#: An engine: requests -> each request's samples, yielded in request order as they finish.
Engine = Callable[[list[SampleRequest], SamplingSettings], Iterable[list[Sample]]]


def request_seed(seed: int, key: str) -> int:
    """The seed of a request's sample 0 (sample j: + j): a hash of (seed, key) alone."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def prompt_of(request: SampleRequest) -> tuple[list[dict[str, Any]], list[str]]:
    """The messages and image files an engine sends: image parts removed when dropped, the prefix as
    a final assistant message."""
    messages, images = request.item.messages, list(request.item.images)
    if request.drop_images:
        messages = [{**m, "content": [p for p in m["content"] if p.get("type") != "image"]} for m in messages]
        images = []
    if request.prefix is not None:
        if not request.prefix:
            raise ValueError(f"{request.key}: empty prefix (pass None to start the answer)")
        messages = [*messages, {"role": "assistant", "content": [{"type": "text", "text": request.prefix}]}]
    return messages, images


# ---------------------------------------------------------------- the run: shards, resume, merge


def _run_header(settings: SamplingSettings, identity: str) -> dict[str, Any]:
    return {"settings": asdict(settings), "engine": identity}


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of a shard's complete lines; a torn last line (no newline) is not read."""
    data = path.read_bytes()
    for number, raw in enumerate(data.split(b"\n")[:-1], start=1):
        if raw.strip():
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON line ({e}); remove the line to go on") from e


def read_shards(out_dir: Path, header: dict[str, Any]) -> dict[str, list[Sample]]:
    """Every finished key in the folder's shards; a line made with other settings stops the run."""
    done: dict[str, list[Sample]] = {}
    for path in sorted(out_dir.glob("samples.rank*.jsonl")):
        for number, line in _read_lines(path):
            theirs = {k: line.get(k) for k in header}
            if theirs != header:
                raise ValueError(
                    f"{path}:{number}: sampled with {theirs}, this run asks {header}; "
                    f"use another output folder or remove {out_dir}"
                )
            done.setdefault(line["key"], [Sample(**s) for s in line["samples"]])
    return done


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line a kill left half-written, so that appending starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def run_sampler(
    requests: list[SampleRequest],
    settings: SamplingSettings,
    engine: Engine,
    out_dir: str | Path,
    *,
    identity: str = "",
    rank: int = 0,
    world_size: int = 1,
    wait_timeout: float = 7 * 24 * 3600,
    poll_s: float = 1.0,
) -> dict[str, list[Sample]]:
    """Sample this rank's share of ``requests`` into ``out_dir`` (resuming), wait for the other ranks, and
    return every request's samples by key; rank 0 also writes ``samples.jsonl`` in request order.

    ``identity`` names the engine and model in each line, so that a resume with another model is refused.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = [r.key for r in requests]
    twice = [k for k, count in Counter(keys).items() if count > 1]
    if twice:
        raise ValueError(f"request key {twice[0]!r} appears twice: keys name requests (and seed them)")
    header = _run_header(settings, identity)
    shard = out / f"samples.rank{rank}.jsonl"
    _cut_torn_tail(shard)
    done = read_shards(out, header)
    todo = [r for r in requests[rank::world_size] if r.key not in done]
    if todo:
        written = 0
        with open(shard, "a", encoding="utf-8") as f:
            for request, samples in zip(todo, engine(todo, settings)):
                line = {"key": request.key, **header, "samples": [asdict(s) for s in samples]}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
                written += 1
        if written != len(todo):
            raise RuntimeError(f"the engine returned {written} results for {len(todo)} requests")
    done = _wait_for_all(out, header, keys, rank, world_size, wait_timeout, poll_s)
    if rank == 0:
        lines = [json.dumps({"key": k, **header, "samples": [asdict(s) for s in done[k]]}) for k in keys]
        from vlmtune.train.runtime.checkpoint import (
            atomic_write,  # (imported here: it pulls in the training stack)
        )

        atomic_write(out / MERGED, "".join(line + "\n" for line in lines))
    return {k: done[k] for k in keys}


def _wait_for_all(
    out: Path,
    header: dict[str, Any],
    keys: list[str],
    rank: int,
    world_size: int,
    timeout: float,
    poll_s: float,
) -> dict[str, list[Sample]]:
    """All shards' results once every key is in: a barrier under torch.distributed, else polling."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    deadline = time.monotonic() + timeout
    while True:
        done = read_shards(out, header)
        missing = [k for k in keys if k not in done]
        if not missing:
            return done
        if world_size == 1 or time.monotonic() > deadline:
            position = {k: i for i, k in enumerate(keys)}
            ranks = sorted({position[k] % world_size for k in missing})
            raise TimeoutError(
                f"{len(missing)} requests unsampled in {out} (ranks {ranks}, e.g. {missing[0]!r}): "
                "rerun those ranks; finished requests are kept"
            )
        time.sleep(poll_s)


# ---------------------------------------------------------------- transformers


class SeededSampling:
    """A logits processor that turns greedy decoding into sampling with one generator per row.

    Temperature and top-p are transformers' own warpers; then each row adds Gumbel noise drawn from its
    own generator, and the argmax greedy decoding takes is a draw from the warped distribution (the
    Gumbel-max trick). Row i's t-th token uses its generator's t-th draw, whatever else is in the batch,
    so a sample does not depend on how requests were batched (beyond float rounding of the logits).
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_p < 1:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.double()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        width = scores.shape[-1]
        uniform = torch.stack([torch.rand(width, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-300)))
        return scores + gumbel.to(scores.device)


class TransformersEngine:
    """`AutoProcessor` + the export's chat template + `generate`, as `transformers_answers` asks (nothing
    of vlmtune's pipeline), ``batch_size`` requests (each as N rows) per call, left-padded.

    Batched and one-at-a-time give the same samples: each row has its own generator, and left padding
    changes the logits only in float rounding (measured: below 1e-6 on the tiny model).
    """

    def __init__(
        self, model_dir: str | Path, batch_size: int = 8, device: str | None = None, dtype: Any = None
    ) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"  # generation continues each row at its end
        kwargs = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()
        self.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.batch_size = batch_size

    def __call__(self, requests: list[SampleRequest], settings: SamplingSettings) -> Iterator[list[Sample]]:
        for start in range(0, len(requests), self.batch_size):
            yield from self._generate(requests[start : start + self.batch_size], settings)

    def _prompt(self, request: SampleRequest) -> tuple[str, list[Any]]:
        messages, images = prompt_of(request)
        cont = request.prefix is not None
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=not cont, continue_final_message=cont, tokenize=False
        )
        return text, load_images(images)

    def _generate(self, chunk: list[SampleRequest], settings: SamplingSettings) -> list[list[Sample]]:
        from transformers import LogitsProcessorList

        rows = 1 if settings.greedy else settings.n
        texts, images, seeds = [], [], []
        for request in chunk:
            text, pictures = self._prompt(request)
            base = request_seed(settings.seed, request.key)
            for j in range(rows):
                texts.append(text)
                images.extend(pictures)
                seeds.append(base + j)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        sampling = [] if settings.greedy else [SeededSampling(seeds, settings.temperature, settings.top_p)]
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList(sampling),
            )
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        samples = [self._sample(ids) for ids in new]
        return [samples[i * rows : (i + 1) * rows] * (settings.n // rows) for i in range(len(chunk))]

    def _sample(self, ids: list[int]) -> Sample:
        """The text up to the first stop token (its text left out, as vLLM does), counted with it."""
        end = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        if end is None:
            return Sample(self.processor.decode(ids, skip_special_tokens=True), "length", len(ids))
        return Sample(self.processor.decode(ids[:end], skip_special_tokens=True), "stop", end + 1)


# ---------------------------------------------------------------- vLLM

#: The line prefix the vLLM worker marks its results with on stdout (vLLM may print there too).
VLLM_RESULT_MARK = "VLMTUNE_SAMPLES "


class VLLMEngine:
    """vLLM in its own venv (`vllm_sample_worker.py`, a subprocess: it pins its own torch); results
    stream back request by request, so a long run is resumable as with transformers."""

    def __init__(self, model_dir: str | Path, chunk: int = 256, trust_remote_code: bool = False) -> None:
        self.python = vllm_python()
        if self.python is None:
            raise RuntimeError(vllm_missing_message())
        self.model_dir = str(model_dir)
        self.trust_remote_code = trust_remote_code or has_original_config(model_dir)
        self.chunk = chunk

    def __call__(self, requests: list[SampleRequest], settings: SamplingSettings) -> Iterator[list[Sample]]:
        rows = 1 if settings.greedy else settings.n
        payload = []
        for r in requests:
            messages, images = prompt_of(r)
            seed = request_seed(settings.seed, r.key)
            cont = r.prefix is not None
            payload.append({"messages": messages, "images": images, "continue": cont, "seed": seed})
        worker = Path(__file__).with_name("vllm_sample_worker.py")
        with tempfile.TemporaryDirectory() as tmp:
            request_path, log_path = Path(tmp) / "request.json", Path(tmp) / "stderr.log"
            request_path.write_text(
                json.dumps(
                    {
                        "model": self.model_dir,
                        "trust_remote_code": self.trust_remote_code,
                        "n": rows,
                        "temperature": settings.temperature,
                        "top_p": settings.top_p,
                        "max_new_tokens": settings.max_new_tokens,
                        "chunk": self.chunk,
                        "requests": payload,
                    }
                )
            )
            env = {**os.environ, "PYTHONPATH": ""}
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: tiny exports need little
            got = 0
            cmd = [str(self.python), str(worker), str(request_path)]
            with (
                open(log_path, "w") as log,
                vllm_process(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env) as proc,
            ):
                assert proc.stdout is not None
                for line in proc.stdout:
                    if line.startswith(VLLM_RESULT_MARK):
                        samples = [Sample(**s) for s in json.loads(line[len(VLLM_RESULT_MARK) :])]
                        got += 1
                        yield samples * (settings.n // rows)
                code = proc.wait()
            if code != 0 or got != len(requests):
                tail = log_path.read_text()[-6000:]
                raise RuntimeError(
                    f"vLLM sampling failed on {self.model_dir} (exit {code}, {got}/{len(requests)}):\n{tail}"
                )


# ------------------------------------------------------------------ what the sampling commands share

ENGINES = ("transformers", "vllm")


@dataclass(kw_only=True)
class SamplingRun:
    """The fields of every sampling command's config that `add_run_arguments` gives flags to, and the
    sampling settings each command redefines with its own defaults (`settings` reads them)."""

    #: Samples per request.
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0
    engine: str = "transformers"
    #: Requests per generate call (transformers engine).
    batch_size: int = 8
    #: Read at most this many records (over all datasets, in meta order); None: all.
    max_questions: int | None = None
    rank: int = 0
    world_size: int = 1
    #: How long a rank waits for the others' shards (flags mode) or at the barrier (torchrun), seconds.
    wait_timeout: float = 7 * 24 * 3600

    def settings(self) -> SamplingSettings:
        """The sampler's settings of this run."""
        return SamplingSettings(self.n, self.temperature, self.top_p, self.max_new_tokens, self.seed)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that samples (make-pairs, prm-data, best-of-n): seed, engine, batching,
    how many questions, and the ranks sharing ``--out``."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="transformers", choices=ENGINES)
    parser.add_argument("--batch-size", type=int, default=8, help="requests per generate call (transformers)")
    parser.add_argument("--max-questions", type=int, default=None)
    parser.add_argument("--rank", type=int, default=None, help="this process's rank, with --world-size")
    parser.add_argument("--world-size", type=int, default=None, help="ranks sharing --out (else torchrun's)")
    parser.add_argument("--wait-timeout", type=float, default=7 * 24 * 3600, help="seconds to wait for ranks")


def command_ranks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[int, int]:
    """(rank, world size) of a sampling command: the flags, else torchrun's environment (a gloo group for
    the barrier); inconsistent flags are a usage error."""
    if (args.rank is None) != (args.world_size is None) or (
        args.world_size is not None and not 0 <= args.rank < args.world_size
    ):
        parser.error("--rank and --world-size go together, with 0 <= rank < world size")
    if args.world_size is not None:
        return args.rank or 0, args.world_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from datetime import timedelta

        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(seconds=args.wait_timeout))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_engine(name: str, model: str, batch_size: int) -> Engine:
    """``--engine``: vLLM in its venv, or transformers (on this rank's GPU under torchrun, if there is one)."""
    if name == "vllm":
        return VLLMEngine(model)
    device = None
    if "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    return TransformersEngine(model, batch_size=batch_size, device=device)
