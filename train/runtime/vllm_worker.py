"""Runs inside vLLM's own venv (no vlmtune there): request.json -> greedy answers -> reply.json.

Standard library and vLLM only. vLLM starts its workers with spawn, so everything runs under the
``__main__`` guard.
"""

import json
import sys


def main(request_path: str, reply_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    request = json.loads(open(request_path).read())
    items = request["items"]
    most_images = max([len(i["images"]) for i in items] + [1])
    llm = LLM(
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
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"])
    conversations = []
    for item in items:
        images = iter([Image.open(p).convert("RGB") for p in item["images"]])
        messages = []
        for m in item["messages"]:
            content = []
            for part in m["content"]:
                if part["type"] == "image":
                    content.append({"type": "image_pil", "image_pil": next(images)})
                else:
                    content.append(part)
            messages.append({"role": m["role"], "content": content})
        conversations.append(messages)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    answers = [o.outputs[0].text for o in outputs]
    with open(reply_path, "w") as f:
        json.dump({"answers": answers}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
