"""Everything the demos need that a fresh machine lacks: synthetic data, the tiny random checkpoint and,
for the MPO and LoRA demos, the SFT model they start from (trained in a subprocess). The pre-training
demo (`experiment=pretrain_demo`) is the SFT demo's images plus a text corpus, mixed by token shares."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("vlmtune")

#: The demo's task mix: what a model this small learns from pixels in a few CPU minutes (counting
#: scattered shapes is left out: it takes far longer); multi-image and pure-text samples keep those
#: paths exercised.
DEMO_TASKS = {"color": 0.47, "shape": 0.47, "multi_image": 0.03, "text": 0.03}
#: Near-square images: squeezing a wide image into a square tile turns circles into ellipses and
#: squares into bars, which a model this small cannot untangle in minutes.
DEMO_MAX_ASPECT = 1.25
#: The LoRA demo's new domain: the colour of the background (vivid here; the SFT demo's backgrounds
#: are pale greys and it is only ever asked about the shape).
LORA_DEMO_TASKS = {"background": 1.0}


def prepare_demo_inputs(cfg: Any) -> None:
    """What a demo preset's ``prepare_demo=true`` runs first (rank 0): the inputs of the MPO demo
    for `vlmtune mpo`, else those of the SFT, LoRA or pre-training demo."""
    from vlmtune.train.runtime.config import MPORunConfig

    if isinstance(cfg, MPORunConfig) and Path(cfg.data.meta_path).parent.name == ONPOLICY_PAIRS:
        prepare_onpolicy_demo(cfg)
    elif isinstance(cfg, MPORunConfig):
        prepare_mpo_demo(cfg)
    elif Path(cfg.data.meta_path).parent.name == PRM_DATA:
        prepare_prm_demo(cfg)
    else:
        prepare_demo(cfg)


def prepare_demo(cfg: Any, num_train: int = 6000, num_eval: int = 200) -> None:
    """Generate the demo dataset and tiny checkpoint where the config expects them, if missing.

    With adapters enabled (`lora.*.enabled`) the demo is the LoRA demo: see `prepare_lora_demo`.
    """
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    if cfg.lora.enabled:
        prepare_lora_demo(cfg)
        return
    meta = Path(cfg.data.meta_path)
    if not meta.exists():
        if meta.name == PRETRAIN_META:
            generate_pretrain_demo_data(meta.parent, num_train, num_eval)
        else:
            generate_demo_data(meta.parent, num_train, num_eval)
    if cfg.model.pretrained is not None and not (Path(cfg.model.pretrained) / "config.json").exists():
        log.info("building the tiny random checkpoint in %s", cfg.model.pretrained)
        build_tiny_checkpoint(cfg.model.pretrained)


def generate_demo_data(folder: Path, num_train: int = 6000, num_eval: int = 200) -> None:
    """The SFT demo's colour/shape data (the same files whichever demo asks for them first)."""
    from vlmtune.data.synthetic import generate_sft_dataset

    log.info("generating the synthetic demo data in %s", folder)
    generate_sft_dataset(
        folder,
        num_train=num_train,
        num_eval=num_eval,
        seed=0,
        task_weights=DEMO_TASKS,
        max_aspect=DEMO_MAX_ASPECT,
    )


#: The pre-training demo's meta file names (`prepare_demo` generates its data when it is asked for).
PRETRAIN_META, PRETRAIN_EVAL_META = "meta_pretrain_train.json", "meta_pretrain_eval.json"
#: The pre-training demo's mixture: target shares of the tokens, text corpus vs image questions.
PRETRAIN_WEIGHTS = {"text": 0.4, "shapes": 0.6}


def generate_pretrain_demo_data(
    folder: Path, num_train: int = 6000, num_eval: int = 200, num_text: int = 4000
) -> None:
    """The pre-training demo's data: the SFT demo's image questions plus a grammar text corpus
    (data/synthetic.py), mixed by token shares (`PRETRAIN_WEIGHTS`) in ``meta_pretrain_train.json``;
    ``meta_pretrain_eval.json`` holds both held-out splits (text scored by perplexity, questions by
    exact match)."""
    from vlmtune.data.synthetic import generate_text_corpus

    generate_demo_data(folder, num_train, num_eval)
    log.info("generating the synthetic text corpus in %s", folder)
    generate_text_corpus(folder, num_train=num_text, num_eval=num_eval, seed=0)
    for split, meta in (("train", PRETRAIN_META), ("eval", PRETRAIN_EVAL_META)):
        entries = {
            f"text_{split}": {"root": ".", "annotation": f"text_{split}.jsonl"},
            f"shapes_{split}": {
                "root": ".",
                "annotation": f"{split}.jsonl",
                "data_augment": split == "train",
            },
        }
        if split == "train":
            entries["text_train"]["weight"] = PRETRAIN_WEIGHTS["text"]
            entries["shapes_train"]["weight"] = PRETRAIN_WEIGHTS["shapes"]
        (folder / meta).write_text(json.dumps(entries, indent=2) + "\n")


def prepare_mpo_demo(cfg: Any, sft_steps: int = 50, num_pairs: int = 3000) -> None:
    """The MPO demo's inputs: the SFT demo data (its held-out split is the eval set), colour/shape
    preference pairs on the same kind of images, and a briefly trained (weak) SFT checkpoint.

    ``sft_steps=50`` leaves the weak model knowing colours but guessing shapes (about 0.58 held-out:
    colours ~88%, shapes ~35%, chance 1/3), so there is room to improve. The pairs answer in one word
    like the eval questions (``reasoning_share=0``): reasoning chains the weak model never saw give
    the reference log-probs of ~-30 nats, rewards and BCO's reward shift then run away, and the
    policy starts answering single-word questions with half a chain (after 250 MPO steps: 0.815
    with 30% chains vs 0.91 without).

    Paths follow the config: pairs beside ``data.meta_path``, the SFT demo data in the same folder,
    the tiny initial checkpoint in ``<that folder>/../tiny_init``, the weak model at ``model.pretrained``.
    """
    from vlmtune.data.synthetic import generate_pair_dataset

    meta = Path(cfg.data.meta_path)
    if not meta.exists():
        log.info("generating the synthetic preference pairs in %s", meta.parent)
        generate_pair_dataset(
            meta.parent,
            num_train=num_pairs,
            num_eval=100,
            seed=0,
            reasoning_share=0.0,
            tasks=("color", "shape"),
            max_aspect=DEMO_MAX_ASPECT,
        )
    train_weak_sft(Path(cfg.model.pretrained), meta.parent, sft_steps)


def train_weak_sft(weak: Path, data: Path, sft_steps: int = 50, meta: str = "meta_train.json") -> None:
    """The MPO demos' starting point at ``weak`` (an ``OUTPUT_DIR/hf``), if missing: the SFT demo on
    ``data/meta`` for ``sft_steps`` steps from ``data/../tiny_init`` (the checkpoint made if missing)."""
    if (weak / "config.json").exists():
        return
    out = weak.parent
    log.info("training an SFT starting point (%d steps on %s) in %s", sft_steps, meta, out)
    run_sft_demo(
        [
            f"train.max_steps={sft_steps}",
            f"train.output_dir={out}",
            "train.save_every=0",
            "eval_data=null",
            f"data.meta_path={data / meta}",
            f"model.pretrained={data.parent / 'tiny_init'}",
        ]
    )


#: The on-policy MPO demo's folder of pairs (``data.meta_path`` = ``<it>/meta.json``, `vlmtune make-pairs`'
#: output); `prepare_demo_inputs` knows the demo by it.
ONPOLICY_PAIRS = "pairs_onpolicy"
#: How the weak model samples its own answers for the on-policy pairs, fixed before any MPO run was
#: looked at. On 200 training questions, 8 samples each (measured, 2 CPU cores): temperature 0.7 left
#: 176 questions with a right and a wrong answer (1 all right, 23 all wrong), 1.0 left 167 (33 all
#: wrong), 1.5 left 93 (107 all wrong, 12 samples cut at the token limit): 0.7 gives the most pairs,
#: and the lowest temperature keeps the answers closest to what the model says greedily.
ONPOLICY_SAMPLING = {"n": 8, "temperature": 0.7, "max_new_tokens": 8, "seed": 0}


def prepare_onpolicy_demo(
    cfg: Any,
    num_questions: int = 800,
    num_eval: int = 500,
    sft_steps: int = 50,
    sampling: dict[str, Any] | None = None,
) -> None:
    """The on-policy MPO demo's inputs: the MPO demo's weak SFT model (``model.pretrained``), preference
    pairs made from its own right and wrong answers to the first ``num_questions`` SFT-demo training
    questions (`vlmtune make-pairs --pipeline correctness` with `ONPOLICY_SAMPLING`, through the seeded
    sampler: chosen = a sample matching the reference, rejected = one that does not), and a held-out set
    of ``num_eval`` questions of its own (seed 2; the SFT demo's 200 leave a 95% interval of +-0.07).

    Paths follow the config: the pairs in the folder of ``data.meta_path`` (named `ONPOLICY_PAIRS`), the
    SFT demo data in ``data`` beside it, the eval set at ``eval_data.meta_path``. ``sampling`` overrides
    fields of `ONPOLICY_SAMPLING` (the shortened test samples fewer answers).
    """
    from vlmtune.data.synthetic import generate_sft_dataset
    from vlmtune.train.commands.make_pairs import PairsConfig, make_pairs

    pairs = Path(cfg.data.meta_path).parent
    data = pairs.parent / "data"
    if not (data / "meta_train.json").exists():
        generate_demo_data(data)
    weak = Path(cfg.model.pretrained)
    train_weak_sft(weak, data, sft_steps)
    if cfg.eval_data is not None and not Path(cfg.eval_data.meta_path).exists():
        folder = Path(cfg.eval_data.meta_path).parent
        log.info("generating the on-policy demo's held-out set (%d questions) in %s", num_eval, folder)
        generate_sft_dataset(
            folder,
            num_train=0,
            num_eval=num_eval,
            seed=2,
            task_weights=DEMO_TASKS,
            max_aspect=DEMO_MAX_ASPECT,
        )
    if not Path(cfg.data.meta_path).exists():
        log.info("sampling the weak model's own answers for pairs in %s", pairs)
        summary = sample_with(
            make_pairs,
            PairsConfig,
            weak,
            meta=str(data / "meta_train.json"),
            out=str(pairs),
            pipeline="correctness",
            max_questions=num_questions,
            **{**ONPOLICY_SAMPLING, **(sampling or {})},
        )
        log.info(
            "%d pairs from %d questions (dropped: %s)",
            summary["pairs"],
            summary["questions"],
            summary["dropped"],
        )


#: The PRM demo's folder of PRM data (``data.meta_path`` = ``<it>/meta.json``, `vlmtune prm-data`'s output);
#: `prepare_demo_inputs` knows the demo by it.
PRM_DATA = "prm_data"
#: How the weak policy samples solutions and Monte-Carlo completions for the PRM data (`vlmtune prm-data`);
#: `vlmtune best-of-n` samples at the same temperature (the preset's header).
PRM_SAMPLING = {"n": 4, "m": 4, "temperature": 1.0, "max_new_tokens": 24, "seed": 0}
#: The weak policy's training questions: the first of the multi-step training split. Why so few, trained
#: for longer (measured on 300 held-out questions, 8 samples each): a policy trained briefly on all 2,000
#: (80 steps) reads the shape at 0.42 when sampling but its answer repeats its own steps only 25% of the
#: time, so a step's Monte-Carlo label says nothing about the step; 150 questions for 250 steps give one
#: whose answers follow its steps (98%) and whose errors are its shape reads (0.69 right, T=1.0).
PRM_POLICY_QUESTIONS = 150


def prepare_prm_demo(
    cfg: Any,
    num_questions: int = 400,
    num_eval: int = 300,
    weak_steps: int = 250,
    base_steps: int = 1500,
    sampling: dict[str, Any] | None = None,
) -> None:
    """The PRM demo's inputs, in the folder above ``data.meta_path`` (``outputs/demo_prm``): the multi-step
    questions (`generate_step_dataset`, with the general mixture), the weak policy (``weak/hf``: the SFT
    demo on the first `PRM_POLICY_QUESTIONS` multi-step questions for ``weak_steps``), the PRM's base
    (``model.pretrained``: a general model, SFT on the general mixture for ``base_steps``, as VisualPRM
    starts from InternVL rather than from the policy) and the PRM data: the weak policy's own solutions
    to the first ``num_questions`` training questions, labelled by its Monte-Carlo completions
    (`vlmtune prm-data` with `PRM_SAMPLING`, ``sampling`` overriding fields). `vlmtune best-of-n` then
    runs the weak policy against the PRM."""
    from vlmtune.data.synthetic import generate_step_dataset, write_split
    from vlmtune.train.commands.prm_data import PRMDataConfig, prm_data
    from vlmtune.train.model.tiny import build_tiny_checkpoint

    prm_dir = Path(cfg.data.meta_path).parent
    root = prm_dir.parent
    data = root / "data"
    if not (data / "meta_general_train.json").exists():
        log.info("generating the multi-step questions in %s", data)
        generate_step_dataset(data, num_eval=num_eval, max_aspect=DEMO_MAX_ASPECT, general=True)
    if not (root / "tiny_init" / "config.json").exists():
        build_tiny_checkpoint(root / "tiny_init")
    if not (data / "meta_policy_train.json").exists():
        lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()[:PRM_POLICY_QUESTIONS]
        write_split(data, "policy_train", "steps_train", [json.loads(line) for line in lines])
    weak = root / "weak" / "hf"
    train_weak_sft(weak, data, weak_steps, meta="meta_policy_train.json")
    base = Path(cfg.model.pretrained)
    if base.parent.parent != root:
        raise ValueError(f"the PRM demo trains its base in {root}; model.pretrained={base} is elsewhere")
    train_weak_sft(base, data, base_steps, meta="meta_general_train.json")
    if not Path(cfg.data.meta_path).exists():
        log.info("labelling the weak policy's own solutions in %s", prm_dir)
        summary = sample_with(
            prm_data,
            PRMDataConfig,
            weak,
            meta=str(data / "meta_train.json"),
            out=str(prm_dir),
            max_questions=num_questions,
            **{**PRM_SAMPLING, **(sampling or {})},
        )
        log.info("PRM data: %s", json.dumps(summary))


def sample_with(command: Any, config: Any, model: Path, **fields: Any) -> dict[str, Any]:
    """A sampling command (`make_pairs`, `prm_data`) run in this process on ``model`` through transformers,
    as its command line would (the same identity in its provenance); returns its summary."""
    from vlmtune.train.runtime.sampler import TransformersEngine

    path = str(model.resolve())
    summary = command(config(model=path, **fields), TransformersEngine(path), identity=f"transformers:{path}")
    assert summary is not None  # rank 0: a demo prepares on one process
    return summary


def run_sft_demo(overrides: list[str]) -> None:
    """`vlmtune sft experiment=demo OVERRIDES` in a fresh single-process run (not this run's ranks)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    subprocess.run(
        [sys.executable, "-m", "vlmtune.train.commands.sft", "experiment=demo", *overrides],
        check=True,
        env=env,
    )


def prepare_lora_demo(cfg: Any, num_train: int = 3000, num_eval: int = 200) -> None:
    """The LoRA demo's inputs: a model trained on the SFT demo (the old domain: colours and shapes)
    and data of a new domain it was never asked about (the background's colour), with one eval set
    holding both.

    Paths follow the config. ``model.pretrained`` is an SFT run's export ``OUTPUT_DIR/hf``: if it
    is missing, the SFT demo runs first with that ``OUTPUT_DIR`` (so an earlier `vlmtune sft
    experiment=demo` is reused as is). The old domain's data is the SFT demo's, in ``data`` beside
    the new domain's folder (the parent of ``data.meta_path``). ``eval_data.meta_path`` gets a meta
    file naming both held-out splits, so eval.json scores each (``per_dataset``) before and after;
    ``meta_train_replay.json`` beside ``data.meta_path`` mixes a tenth of the old training set into
    the new one (rehearsal against forgetting).
    """
    from vlmtune.data.synthetic import generate_sft_dataset

    new = Path(cfg.data.meta_path).parent
    old = new.parent / "data"
    if new.resolve() == old.resolve():
        raise ValueError(
            f"data.meta_path={cfg.data.meta_path}: prepare_demo with adapters prepares the LoRA demo, whose "
            "new domain has its own folder beside the SFT demo's `data`; use experiment=demo_lora, or "
            "prepare_demo=false to train adapters on the SFT demo's data"
        )
    base = Path(cfg.model.pretrained)
    if not (base / "config.json").exists():
        if base.name != "hf":
            raise ValueError(
                f"model.pretrained={base} does not exist: the LoRA demo adapts a trained SFT model; "
                "point it at an SFT run's OUTPUT_DIR/hf (it is trained first when missing)"
            )
        log.info("no SFT model at %s: running the SFT demo first (old domain: colours and shapes)", base)
        run_sft_demo(
            [
                f"train.output_dir={base.parent}",
                f"data.meta_path={old / 'meta_train.json'}",
                f"eval_data.meta_path={old / 'meta_eval.json'}",
                f"model.pretrained={new.parent / 'tiny_init'}",
            ]
        )
    if not (old / "meta_eval.json").exists():
        generate_demo_data(old)
    if not (new / "meta_train.json").exists():
        log.info("generating the new domain's data (background colour) in %s", new)
        generate_sft_dataset(
            new,
            num_train=num_train,
            num_eval=num_eval,
            seed=1,
            task_weights=LORA_DEMO_TASKS,
            max_aspect=DEMO_MAX_ASPECT,
            name="background",
        )
    metas = {
        new / "meta_train_replay.json": {
            "background_train": (new, "train", 1.0),
            "shapes_replay": (old, "train", 0.1),
        }
    }
    if cfg.eval_data is not None:
        metas[Path(cfg.eval_data.meta_path)] = {
            "background_eval": (new, "eval", 1.0),
            "shapes_eval": (old, "eval", 1.0),
        }
    for meta, datasets in metas.items():
        if not meta.exists():
            write_multi_meta(meta, datasets)


def write_multi_meta(meta: Path, datasets: dict[str, tuple[Path, str, float]]) -> None:
    """A meta file over splits of datasets in other folders: name -> (folder, "train" | "eval", repeat_time).

    Paths are written relative to the meta file, so the folders can move together; training splits
    keep their augmentation.
    """
    entries = {}
    for name, (folder, split, repeat) in datasets.items():
        rel = Path(os.path.relpath(folder, meta.parent))
        entries[name] = {
            "root": str(rel),
            "annotation": str(rel / f"{split}.jsonl"),
            "repeat_time": repeat,
            "data_augment": split == "train",
        }
    meta.write_text(json.dumps(entries, indent=2) + "\n")
