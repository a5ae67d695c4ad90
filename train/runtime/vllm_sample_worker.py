"""Runs inside vLLM's own venv (no vlmtune there): request.json -> seeded samples, one stdout line per request.

The sampling counterpart of vllm_worker.py (its engine settings, `build_llm`). Each request carries its seed
(``SamplingParams(seed=s, n=N)``: vLLM seeds child j with ``s + j``, the sampler's definition) and
whether it continues a final assistant message. Results are printed as ``VLMTUNE_SAMPLES <json>`` in
request order, a chunk of requests at a time, so the caller can record them as they finish. Standard
library and vLLM only; everything runs under the ``__main__`` guard (vLLM spawns its workers).
"""

import json
import sys

from vllm_worker import build_llm, to_vllm  # beside this file (a script's folder is on sys.path)

MARK = "VLMTUNE_SAMPLES "  # = sampler.VLLM_RESULT_MARK


def main(request_path: str) -> None:
    from vllm import SamplingParams

    request = json.loads(open(request_path).read())
    items = request["requests"]
    llm = build_llm(request, items)
    chunk = max(1, int(request.get("chunk", 256)))
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        results = [None] * len(part)
        for cont in (False, True):  # continue_final_message is one flag per chat() call
            idx = [i for i, r in enumerate(part) if bool(r["continue"]) == cont]
            if not idx:
                continue
            params = [
                SamplingParams(
                    n=request["n"],
                    temperature=request["temperature"],
                    top_p=request["top_p"],
                    max_tokens=request["max_new_tokens"],
                    seed=part[i]["seed"],
                )
                for i in idx
            ]
            outputs = llm.chat(
                [to_vllm(part[i]["messages"], part[i]["images"]) for i in idx],
                params,
                use_tqdm=False,
                add_generation_prompt=not cont,
                continue_final_message=cont,
            )
            for i, o in zip(idx, outputs):
                results[i] = [
                    {"text": c.text, "finish_reason": c.finish_reason, "num_tokens": len(c.token_ids)}
                    for c in sorted(o.outputs, key=lambda c: c.index)
                ]
        for samples in results:
            sys.stdout.write(MARK + json.dumps(samples) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1])
