"""The tiny InternVL3 stand-in: a locally trained tokenizer and a random-weight checkpoint.

Everything here is built offline (no model hub), so tests and the demo run anywhere. The tokenizer
mirrors Qwen2.5's byte-level BPE (same pre-tokenizer regex, same special tokens, same chat format) at
a vocabulary of ~1.5k; the checkpoint uses the very classes of the real `-hf` checkpoints
(`InternVLForConditionalGeneration` + `InternVLProcessor`), just with small shapes.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from vlmtune.configs import CONFIG_DIR
from vlmtune.data.serving import INTERNVL3_HF_CHAT_TEMPLATE as CHAT_TEMPLATE

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VIDEO_TOKEN = "<video>"
GROUNDING_TOKENS = ("<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")

#: Added after the BPE vocabulary, in Qwen2.5 / InternVL3-hf order (`<video>` last: it only marks
#: where the processor expands a video and never reaches the model).
SPECIAL_TOKENS = (
    PAD_TOKEN,
    IM_START,
    IM_END,
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    *GROUNDING_TOKENS,
    VIDEO_TOKEN,
)

#: The names `InternVLProcessor.__init__` reads off the tokenizer (transformers 5 turns a dict of
#: `extra_special_tokens` into attributes `<name>` and `<name>_id`).
NAMED_SPECIAL_TOKENS = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO_TOKEN,
}

#: Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5): contractions, letter runs, single digits,
#: punctuation runs, newlines, whitespace.
QWEN2_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

TOKENIZER_VOCAB_SIZE = 1536  # BPE vocabulary incl. the 256 byte alphabet; special tokens come on top
MODEL_MAX_LENGTH = 8192

_COLOURS = (
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "black",
    "white",
    "grey",
    "pink",
    "brown",
    "cyan",
)
_SHAPES = (
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "hexagon",
    "diamond",
    "ellipse",
    "line",
    "dot",
)
_PLACES = ("left", "right", "top", "bottom", "centre", "center", "middle", "corner", "edge")
_SIZES = ("small", "large", "big", "tiny", "medium")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_WORDS = """\
about above across after again against all almost alone along already also although always among an and another any
anyone anything appear apple are area around arrow as ask at away back ball be because become bed been before begin
behind being below beside best better between bird body book both box boy bread bridge bring build but by call came
can cannot card carry case cause chair change check child choose city class clear close cloud colour color come common
could count cup cut dark day describe detail different do does dog door down draw during each early earth easy eat
else empty end enough even evening every example eye face fact fall family far fast few field figure find fine fire
first fish floor flower follow food foot for form found free friend from front full game garden gave get girl give
glass go good great green ground group grow had half hand happy hard has have he head hear heart heavy help her here
high hill him his hold hole home horse hot hour house how however idea if important in inside into is it its just keep
kind know land language last late later learn least leave less let letter life light like list little live long look
low made main make man many map may me mean measure might mind minute more morning most mother mountain move much
must my name near need never new next night no not note nothing now number object of off often old on once only open
or order other our out outside over own page paper part pass past pattern people person picture piece place plan
plant play point position possible power present problem pull push put question quick quiet rain reach read ready
real reason region remember rest river road rock room round row rule run said same saw say school sea second see seem
self sentence set several shape she short should show side sign simple since sing sit size sky sleep slow small snow
so some something sometimes song soon sound space stand start state stay step still stone stop story street strong
study such sun sure surface table take talk tall teacher tell than that their them then there these they thing think
this those though thought through time to today together told too took toward town train travel tree true try turn
under until up upon us use usually very view wait walk wall want warm was watch water way we well went were what
wheel when where which while why wide will window with without woman word work world would write year yes yet you
young your above below inside outside visible hidden bright shadow texture edge border frame video scene action
"""
_PROSE = """\
You are a helpful assistant. Look at the image and answer the question.
What is shown in this picture? Describe the image in detail. How many objects are there?
Which colour is the largest shape? Is there a circle in the image? Yes, there is. No, there is not.
The answer is. The image shows a scene with several coloured shapes on a plain background.
Please think step by step, then give the final answer. Explain your reasoning briefly.
The first frame shows, the second frame shows, and in the last frame the object has moved.
Question: Answer: Options: (A) (B) (C) (D) Choose the correct option. The correct option is
Read the text in the image. Count the items. Compare the two images. What changed between them?
I think that the picture contains a dog, a cat, a house, a tree, a car and a person walking.
This is a photo of a street in the city at night; the lights are bright and the road is wet.
"""


def _training_corpus() -> list[str]:
    """A small, deterministic English corpus biased to what the synthetic data says (colours, shapes, counts)."""
    lines = _PROSE.splitlines() + _WORDS.splitlines()
    words = _WORDS.split()
    lines += [" ".join(words[k : k + 9]).capitalize() + "." for k in range(0, len(words), 9)]
    for i, colour in enumerate(_COLOURS):
        for j, shape in enumerate(_SHAPES):
            place = _PLACES[(i + j) % len(_PLACES)]
            size = _SIZES[(i * j) % len(_SIZES)]
            n = (i * 7 + j * 3) % 11
            lines.append(f"A {size} {colour} {shape} is at the {place} of the image.")
            lines.append(
                f"There are {n} {colour} {shape}s ({_NUMBER_WORDS[n]}), at x={i * 13 % 100}, y={j * 29 % 100}."
            )
            lines.append(f"Q: What colour is the {shape}? A: The {shape} is {colour}.")
            lines.append(
                f'{{"shape": "{shape}", "colour": "{colour}", "count": {n}, "box": [{i}, {j}, {i + 9}, {j + 9}]}}'
            )
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 -1 +2 = 50% #1 @ & * / \\ | ~ ^ _ ` < > [ ] { }")
    lines.append("!?.,;:'\" ... -- () '' \"\" ' '")
    return lines


def _train_bpe(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


@lru_cache(maxsize=1)
def _trained_bpe() -> Tokenizer:
    return _train_bpe(TOKENIZER_VOCAB_SIZE)


def build_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The tiny Qwen2.5-style tokenizer, in memory; also written to `out_dir` when given.

    Lossless (no normaliser: Qwen2.5's NFC step is left out so `decode(encode(x)) == x` for any
    string) and special tokens are never split. `eos_token` is `<|im_end|>` and `pad_token` is
    `<|endoftext|>`, as in Qwen2.5-Instruct / InternVL3-hf.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_trained_bpe(),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(NAMED_SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    named = {PAD_TOKEN, IM_END, *NAMED_SPECIAL_TOKENS.values()}
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [t for t in SPECIAL_TOKENS if t not in named]},
        replace_extra_special_tokens=False,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


TINY_CONFIG = Path(CONFIG_DIR) / "model" / "tiny.yaml"
TINY_SEED = 0


def load_tiny_model_config():
    """`configs/model/tiny.yaml` as a `ModelConfig` (through OmegaConf, as Hydra would load it)."""
    from omegaconf import OmegaConf

    from vlmtune.train.model.build import ModelConfig

    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(TINY_CONFIG))
    return OmegaConf.to_object(merged)


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, image_seq_length: int):
    """`InternVLProcessor` as InternVL3-hf ships it (up to 12 tiles + thumbnail), at the given tile size."""
    from vlmtune.data.serving import build_processor as internvl_processor

    return internvl_processor(tokenizer, image_size, image_seq_length, CHAT_TEMPLATE)


def build_tiny_checkpoint(path: str | Path) -> Path:
    """Write the tiny model (fixed seed, safetensors), tokenizer and processor to `path` in `-hf` layout.

    Afterwards `AutoProcessor`, `AutoTokenizer` and `InternVLForConditionalGeneration.from_pretrained(path)`
    all work offline.
    """
    import torch

    from vlmtune.train.model.build import build_model, num_image_tokens_per_tile, tile_size

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = load_tiny_model_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = build_model(cfg, tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    image_size = tile_size(model.config.vision_config)
    processor = build_processor(tokenizer, image_size, num_image_tokens_per_tile(model.config))
    processor.save_pretrained(path)
    return path
