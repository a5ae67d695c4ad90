"""What serving stacks read from an export (tiling, chat template, stop token), written to equal training.

transformers' `AutoProcessor`, vLLM and lmdeploy take the tiling (`max_patches`, thumbnail, tile
size, normalisation), the chat template (system prompt, image placeholder) and the stop token from
the model directory, never from vlmtune. Copied from the base checkpoint they describe InternVL3's
defaults, not the run: measured on the demo, `max_patches: 12` on a model trained with one tile per
image took held-out exact match from 0.96 to 0.77 (transformers) and 0.78 (vLLM). So every export
writes them from the run's own data settings (``sample_settings``), and says where a serving stack
cannot follow the run (per-dataset tiling, no thumbnail, V2PE).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("vlmtune")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IM_END = "<|im_end|>"

#: InternVL3-hf's chat template (transformers' convert_internvl_weights_to_hf.py), with the image
#: placeholder the processor looks for (`<IMG_CONTEXT>`). No default system prompt is injected, so
#: a system turn appears only when the conversation has one.
INTERNVL3_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def chat_template_with_system(template: str, system_prompt: str | None) -> str:
    """``template`` that opens with ``system_prompt`` as a system turn when a conversation has none,
    as training did (InternVL3's trainer always inserts its default prompt; the -hf template inserts
    nothing). ``None``: the template unchanged (the run trained without a system turn)."""
    if system_prompt is None:
        return template
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal
    return (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        "{{- '<|im_start|>system\\n' + " + literal + " + '<|im_end|>\\n' }}"
        "{%- endif %}" + template
    )


def build_processor(tokenizer: Any, image_size: int, image_seq_length: int, chat_template: str) -> Any:
    """An `InternVLProcessor` as InternVL3-hf ships it (GotOcr2 image processor: bicubic, ImageNet
    mean/std, up to 12 tiles + thumbnail), at the given tile size; `configure_processor` then sets the
    run's tiling."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor
    from transformers.image_utils import PILImageResampling

    size = {"height": image_size, "width": image_size}
    image_processor = GotOcr2ImageProcessor(
        do_resize=True,
        size=size,
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
    )
    video_processor = InternVLVideoProcessor(
        size=size,
        resample=PILImageResampling.BICUBIC,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=image_seq_length,
        chat_template=chat_template,
    )


def configure_processor(processor: Any, settings: dict[str, Any]) -> list[str]:
    """Set the processor's tiling from the run's data settings (``sample_settings``); returns what a
    serving stack will still do differently from training, for the export to say."""
    from transformers.image_utils import PILImageResampling

    size = {"height": settings["image_size"], "width": settings["image_size"]}
    image = processor.image_processor
    image.size = size
    image.max_patches = settings["max_dynamic_patch"]
    image.min_patches = settings["min_dynamic_patch"]
    image.crop_to_patches = settings["max_dynamic_patch"] > 1
    image.resample = PILImageResampling.BICUBIC
    image.image_mean, image.image_std = IMAGENET_MEAN, IMAGENET_STD
    video = getattr(processor, "video_processor", None)
    if video is not None:
        video.size = size
        video.image_mean, video.image_std = IMAGENET_MEAN, IMAGENET_STD
    gaps = []
    if settings["max_dynamic_patch"] > 1:
        gaps.append(
            f"multi-image samples: training gave each of n images max_dynamic_patch // n tiles (InternVL's "
            f"rule); a processor gives every image up to max_patches={settings['max_dynamic_patch']}"
        )
    if not settings["use_thumbnail"] and settings["max_dynamic_patch"] > 1:
        gaps.append(
            "data.use_thumbnail=false: transformers' InternVL processor (and vLLM's) always add a "
            "thumbnail tile to a multi-tile image"
        )
    return gaps


def serving_processor(
    tokenizer: Any, source_dir: str | None, settings: dict[str, Any], image_seq_length: int
):
    """The processor to save with an export: the source checkpoint's (its classes and extra fields),
    else a new one, with the run's tiling, chat template and system prompt."""
    from transformers import AutoProcessor

    template = tokenizer.chat_template
    processor = None
    if source_dir is not None and (Path(source_dir) / "processor_config.json").exists():
        processor = AutoProcessor.from_pretrained(source_dir)
        processor.tokenizer = tokenizer
        template = processor.chat_template or template
    if template is None:  # e.g. an original-format base: its format is InternVL3's (checked at start)
        log.warning("%s: no chat template; the export gets InternVL3-hf's", source_dir)
        template = INTERNVL3_HF_CHAT_TEMPLATE
    template = chat_template_with_system(split_system_default(template)[1], settings.get("system_prompt"))
    if processor is None:
        processor = build_processor(tokenizer, settings["image_size"], image_seq_length, template)
    processor.chat_template = template
    tokenizer.chat_template = template
    processor.image_seq_length = image_seq_length
    return processor, configure_processor(processor, settings)


#: What `chat_template_with_system` writes: the system prompt as a JSON string literal.
_SYSTEM_PREFIX = re.compile(
    r"\{%- if not messages or messages\[0\]\['role'\] != 'system' %\}"
    r"\{\{- '<\|im_start\|>system\\n' \+ (?P<literal>\"(?:[^\"\\]|\\.)*\") \+ '<\|im_end\|>\\n' \}\}"
    r"\{%- endif %\}"
)


def split_system_default(template: str) -> tuple[str | None, str]:
    """(the default system prompt ``chat_template_with_system`` put in front of ``template``, the template
    without it); (None, template) for a template it did not write. Re-exports, merges and conversions
    read it back instead of stacking a second prefix."""
    found = _SYSTEM_PREFIX.match(template)
    if found is None:
        return None, template
    try:
        return json.loads(found["literal"]), template[found.end() :]
    except json.JSONDecodeError:
        return None, template


def stop_at_im_end(generation_config: Any, tokenizer: Any) -> None:
    """Greedy, stopping at ``<|im_end|>`` (what evaluation does): no sampling defaults a server would
    apply where vlmtune's eval decodes greedily."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    generation_config.eos_token_id = [im_end, *[e for e in eos if e != im_end]]
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.do_sample = False
    for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if hasattr(generation_config, name):
            setattr(generation_config, name, None)


def per_dataset_tiling(specs: list, settings: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Datasets of the meta file that tiled differently from the run's default (their meta entry's
    ``max_dynamic_patch``/``min_dynamic_patch``): kept in vlmtune.json, since a processor has one value."""
    out = {}
    for spec in specs:
        own = {
            key: value
            for key, value in (
                ("max_dynamic_patch", spec.max_dynamic_patch),
                ("min_dynamic_patch", spec.min_dynamic_patch),
            )
            if value is not None and value != settings[key]
        }
        if own:
            out[spec.name] = own
    return out


def write_serving_files(
    out: Path,
    tokenizer: Any,
    source_dir: str | None,
    settings: dict[str, Any] | None,
    image_seq_length: int,
    per_dataset: dict[str, dict[str, int]] | None = None,
) -> list[str]:
    """Tokenizer, processor files and chat template for ``out``; returns the gaps to warn about."""
    if settings is None:  # nothing known about the run's data: copy what the source has
        tokenizer.save_pretrained(out)
        return []
    processor, gaps = serving_processor(tokenizer, source_dir, settings, image_seq_length)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for dataset, own in (per_dataset or {}).items():
        gaps.append(
            f"dataset {dataset!r} trained with {own}; the processor carries the run's default "
            f"max_dynamic_patch={settings['max_dynamic_patch']} (per-dataset values are in vlmtune.json)"
        )
    return gaps
