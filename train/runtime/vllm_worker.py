"""Runs inside vLLM's own venv (no vlmtune there): request.json -> greedy answers -> reply.json.

Standard library and vLLM only. vLLM starts its workers with spawn, so everything runs under the
``__main__`` guard. ``build_llm`` and ``to_vllm`` also serve the sampler's worker (vllm_sample_worker.py,
beside this file: one set of engine settings for evaluation and sampling).
"""

import json
import sys


def build_llm(request, items):
    """The engine as evaluation and sampling use it: fp32, eager, seeded, sized for the requests' images."""
    from vllm import LLM

    most_images = max([len(i["images"]) for i in items] + [1])
    return LLM(
        model=request["model"],
        dtype="float32",
        max_model_len=request.get("max_model_len", 8192),
        limit_mm_per_prompt={"image": most_images, "video": 0},
        enforce_eager=True,
        seed=0,
        # an original-layout export's config class is a configuration_internvl_chat.py of its own
        trust_remote_code=bool(request.get("trust_remote_code", False)),
        # on the CPU backend this is the share of the machine's memory vLLM reserves at start
        gpu_memory_utilization=request.get("memory_fraction", 0.2),
    )


def to_vllm(messages, paths):
    """Chat messages with PIL images in place of the image parts, in order."""
    from PIL import Image

    images = iter([Image.open(p).convert("RGB") for p in paths])
    out = []
    for m in messages:
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                content.append({"type": "image_pil", "image_pil": next(images)})
            else:
                content.append(part)
        out.append({"role": m["role"], "content": content})
    return out


def main(request_path: str, reply_path: str) -> None:
    from vllm import SamplingParams

    request = json.loads(open(request_path).read())
    items = request["items"]
    llm = build_llm(request, items)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    conversations = [to_vllm(item["messages"], item["images"]) for item in items]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    answers = [o.outputs[0].text for o in outputs]
    with open(reply_path, "w") as f:
        json.dump({"answers": answers}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
