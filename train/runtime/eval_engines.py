"""Evaluation through the stacks users serve with: plain transformers and vLLM, beside vlmtune's own.

Neither engine uses vlmtune's sample pipeline: each reads the eval records as a client would (the
image files and the question text of the jsonl), prompts with the export's own chat template and
processor, and decodes greedily. What they answer is what a deployed model answers, so comparing
them with `vlmtune eval` catches every difference between training and serving (tiling, template,
system prompt, weight layout) that a check through our own loading code would hide.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
#: Where `scripts/make_serving_venv.sh` puts vLLM (a venv of its own: it pins its own torch), outside the
#: checkout so that it survives clean checkouts; ``VLMTUNE_VLLM_PYTHON`` names another interpreter.
VLLM_PYTHON_ENV = "VLMTUNE_VLLM_PYTHON"
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "vlmtune" / "vllm-venv"


@dataclass
class EvalItem:
    """One held-out question as a client sends it: chat messages with image parts, the image files."""

    source: str  # file:line of the record
    dataset: str
    answer: str
    messages: list[dict[str, Any]]
    images: list[str] = field(default_factory=list)
    record: int = 0  # the record's index in its annotation file

    @property
    def question(self) -> str:
        """The text of the last user turn (what the majority baseline groups answers by)."""
        user = [m for m in self.messages if m["role"] == "user"][-1]
        return "".join(part.get("text", "") for part in user["content"])


def human_content(text: str, num_images: int) -> list[dict[str, Any]]:
    """A user turn as content parts: images where the record puts ``<image>`` (the newline after a
    placeholder belongs to the template's image part), or all images first when it names none."""
    if IMAGE_PLACEHOLDER not in text:
        prefix = [{"type": "image"}] if num_images == 1 else []
        if num_images > 1:  # InternVL's multi-image prompt: "Image-1: <image>\nImage-2: <image>\n..."
            for i in range(1, num_images + 1):
                prefix += [{"type": "text", "text": f"Image-{i}: "}, {"type": "image"}]
        return [*prefix, {"type": "text", "text": text}]
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece[1:] if piece.startswith("\n") else piece
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def image_file(ref: str, root: Path) -> str:
    """A file the serving engines can open for a record's image: ``root / ref`` for a path; an image embedded
    in a Hugging Face dataset row is written once to a cache file named by its content."""
    import hashlib
    import tempfile

    from vlmtune.data.media import EmbeddedImage, resolve_media

    if not isinstance(ref, EmbeddedImage):
        return str(resolve_media(root, ref))  # root / ref (an absolute ref stays itself)
    folder = Path(tempfile.gettempdir()) / "vlmtune-embedded-images"
    folder.mkdir(exist_ok=True)
    path = folder / hashlib.sha256(ref.data).hexdigest()
    if not path.exists():
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(ref.data)
        partial.replace(path)
    return str(path)


def record_to_item(
    record: dict[str, Any], root: Path, source: str, dataset: str, index: int = 0
) -> EvalItem | None:
    """The record's conversation up to its last answer; None for what these engines don't take
    (video, text records without a conversation)."""
    if "video" in record or "conversations" not in record:
        return None
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    paths = [image_file(p, root) for p in images]
    turns = record["conversations"]
    last = max(i for i, t in enumerate(turns) if t["from"] == "gpt")
    messages: list[dict[str, Any]] = []
    first_human = True
    for turn in turns[:last]:
        if turn["from"] == "system":
            messages.append({"role": "system", "content": [{"type": "text", "text": turn["value"]}]})
        elif turn["from"] == "human":
            n = len(paths) if first_human else 0
            messages.append({"role": "user", "content": human_content(turn["value"], n)})
            first_human = False
        else:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": turn["value"]}]})
    return EvalItem(source, dataset, turns[last]["value"].strip(), messages, paths, index)


def eval_items(meta_path: str, seed: int, max_samples: int | None) -> list[EvalItem]:
    """The held-out questions in `vlmtune eval`'s order (the meta file's seeded index)."""
    from vlmtune.data.meta import build_index, load_meta, record_source

    specs = load_meta(meta_path)
    index = build_index(specs, seed)[: max_samples if max_samples is not None else None]
    items = []
    for ds, line in index:
        spec, jf = specs[ds], record_source(specs[ds])
        try:
            record = jf.read(line)
        except Exception:  # a bad line: vlmtune's eval skips it too
            continue
        item = record_to_item(record, spec.root, jf.source(line), spec.name, line)
        if item is not None:
            items.append(item)
    return items


def load_images(paths: list[str]) -> list[Any]:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]


def transformers_answers(model_dir: str, items: list[EvalItem], max_new_tokens: int, base: str | None = None):
    """Greedy answers from `AutoProcessor` + its chat template + `generate`: nothing of vlmtune.

    An adapter directory is loaded as peft users do: the base model, then `PeftModel.from_pretrained`.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    adapter = (Path(model_dir) / "adapter_config.json").exists()
    if adapter:
        from peft import PeftConfig, PeftModel

        base = base or PeftConfig.from_pretrained(model_dir).base_model_name_or_path
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), model_dir)
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.eval()
    answers = []
    with torch.no_grad():
        for item in items:
            text = processor.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
            images = load_images(item.images) or None
            inputs = processor(text=text, images=images, return_tensors="pt")
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers.append(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def vllm_python() -> Path | None:
    """The serving venv's interpreter, if it exists."""
    path = Path(os.environ.get(VLLM_PYTHON_ENV, DEFAULT_VLLM_VENV / "bin" / "python"))
    return path if path.exists() else None


def vllm_missing_message() -> str:
    return (
        f"vLLM's serving venv not found (set {VLLM_PYTHON_ENV} or create {DEFAULT_VLLM_VENV} with "
        "`bash scripts/make_serving_venv.sh`)"
    )


def has_original_config(model_dir: str | Path) -> bool:
    """An original-layout export (config.json says InternVLChatModel): its config class is the
    configuration_internvl_chat.py written beside it, so vLLM loads it with trust_remote_code (the
    directory holds no modeling code; vLLM serves it with its own InternVLChatModel)."""
    config_path = Path(model_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return "InternVLChatModel" in (config.get("architectures") or [])


def vllm_answers(
    model_dir: str,
    items: list[EvalItem],
    max_new_tokens: int,
    timeout: int = 1800,
    *,
    trust_remote_code: bool = False,
) -> list[str]:
    """Greedy answers from vLLM (its own venv, in a subprocess: it pins its own torch).

    ``trust_remote_code`` is also set for an original-layout export (config.json says
    InternVLChatModel): its config class is the configuration_internvl_chat.py written next to it
    (vLLM serves it with its own InternVLChatModel; the directory has no modeling code).
    """
    trust_remote_code = trust_remote_code or has_original_config(model_dir)
    python = vllm_python()
    if python is None:
        raise RuntimeError(vllm_missing_message())
    worker = Path(__file__).with_name("vllm_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        request, reply = Path(tmp) / "request.json", Path(tmp) / "reply.json"
        request.write_text(
            json.dumps(
                {
                    "model": str(model_dir),
                    "max_new_tokens": max_new_tokens,
                    "trust_remote_code": trust_remote_code,
                    "items": [asdict(i) for i in items],
                }
            )
        )
        env = {**os.environ, "PYTHONPATH": ""}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: tiny exports need little
        cmd = [str(python), str(worker), str(request), str(reply)]
        with vllm_process(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            _, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM failed on {model_dir} ({proc.returncode}):\n{stderr[-6000:]}")
        return json.loads(reply.read_text())["answers"]


@contextmanager
def vllm_process(cmd: list[str], **popen_kwargs: Any) -> Iterator[subprocess.Popen]:
    """A vLLM worker in a process group of its own, the whole group killed on the way out.

    vLLM runs its engine in child processes (EngineCore, workers): killing only the worker (a timeout, a
    consumer that stops early) or a worker that exits without shutting its engine down left them
    running, orphaned, each holding gigabytes."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
    try:
        yield proc
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already
            pass
        proc.wait()


def against_vlmtune(
    records: list[dict], items: list[EvalItem], answers: list[str]
) -> tuple[dict[str, str], list[tuple[EvalItem, str, bool]]]:
    """vlmtune's answers by file:line (``records`` of `evaluate_accuracy`), and for every item vlmtune
    answered: (item, the engine's answer, whether the two agree, normalised)."""
    from vlmtune.data.answers import normalise_answer

    ours = {r["source"]: r["prediction"] for r in records}
    rows = [
        (i, a, normalise_answer(a) == normalise_answer(ours[i.source]))
        for i, a in zip(items, answers)
        if i.source in ours
    ]
    return ours, rows


#: The end-of-run check loads the export a second time in one process: beyond this, say how instead.
SERVING_CHECK_MAX_PARAMS = 3e9


def serving_check(
    export_dir: Path,
    records: list[dict],
    data_cfg: Any,
    tokenizer: Any,
    tokens_per_tile: int,
    num: int,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Ask the first ``num`` held-out questions again through plain transformers and compare with
    vlmtune's answers (``records`` of `evaluate_accuracy`, generated with up to ``max_new_tokens``: the
    same limit here, or every longer answer reads as a disagreement); the first disagreement is
    diagnosed (prompt ids, tiles, pixels) against vlmtune's own sample of the same record."""
    answered = {r["source"] for r in records}
    items = [i for i in eval_items(data_cfg.meta_path, data_cfg.seed, None) if i.source in answered][:num]
    ours, rows = against_vlmtune(
        records, items, transformers_answers(str(export_dir), items, max_new_tokens=max_new_tokens)
    )
    result: dict[str, Any] = {"n": len(rows), "agreement": sum(ok for *_, ok in rows) / max(1, len(rows))}
    wrong = [(i, a) for i, a, ok in rows if not ok]
    if wrong:
        item, answer = wrong[0]
        result["first_disagreement"] = {
            "source": item.source,
            "vlmtune": ours[item.source],
            "transformers": answer,
            **diagnose(export_dir, item, data_cfg, tokenizer, tokens_per_tile),
        }
    return result


def diagnose(export_dir: Path, item: EvalItem, data_cfg: Any, tokenizer: Any, tokens_per_tile: int) -> dict:
    """Where the export's processor and chat template build other inputs than training for ``item``."""
    import random

    from transformers import AutoConfig, AutoProcessor

    from vlmtune.data.dataset import SampleProcessor
    from vlmtune.data.meta import load_meta
    from vlmtune.train.runtime.evaluate import split_prompt_answer

    spec = next(s for s in load_meta(data_cfg.meta_path) if s.name == item.dataset)
    sample = SampleProcessor(data_cfg, tokenizer, tokens_per_tile)(spec, item.record, random.Random(0), False)
    prompt, _, _ = split_prompt_answer(sample, tokenizer)
    processor = AutoProcessor.from_pretrained(export_dir)
    text = processor.apply_chat_template(item.messages, add_generation_prompt=True, tokenize=False)
    served = processor(text=text, images=load_images(item.images) or None, return_tensors="pt")
    ids = served["input_ids"][0].tolist()
    first = next((k for k, (a, b) in enumerate(zip(ids, prompt.tolist())) if a != b), None)
    out: dict[str, Any] = {
        "input_ids_equal": ids == prompt.tolist(),
        "input_lengths": {"vlmtune": len(prompt), "export": len(ids)},
        "first_differing_token": first,
    }
    pixels = served.get("pixel_values")
    out["tiles"] = {"vlmtune": int(sample["num_tiles"]), "export": 0 if pixels is None else len(pixels)}
    same_tiles = out["tiles"]["vlmtune"] == out["tiles"]["export"]
    if out["input_ids_equal"] and same_tiles:
        delta = getattr(AutoConfig.from_pretrained(export_dir), "v2pe_delta", None)
        out["verdict"] = (
            f"the same inputs: the model computes otherwise outside vlmtune (V2PE v2pe_delta={delta} is "
            "ignored by transformers and vLLM)"
            if delta not in (None, 1.0)
            else "the same inputs: the difference is in the weights or numerics, not the processor"
        )
    if pixels is not None and pixels.shape == sample["pixel_values"].shape:
        out["pixel_max_abs_diff"] = float((pixels - sample["pixel_values"]).abs().max())
    return out
