"""Convert the bundled GGUF into a Hugging Face folder in bf16, the form vLLM loads.

Runs inside the model-server virtual environment (``make vllm``), never inside the chatbot:
it needs torch, transformers, gguf and accelerate, which the product does not carry.

    python deploy/vllm/convert_gguf.py <model.gguf> [<output folder>]

The output defaults to the GGUF's path without ``.gguf`` plus ``-hf-bf16``, beside it in the
chatbot's cache directory. A folder that already holds a complete conversion is left alone.

vLLM 0.32 cannot load this GGUF itself. transformers dequantises it on load, but refuses to
``save_pretrained`` a model that still carries its GGUF ``quantization_config``; so the
dequantised weights are moved into a model built from the same configuration without it,
and that one is saved in bf16, the dtype vLLM's CPU backend runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

DONE = "conversion.json"  # written last: its presence means the folder is complete


def default_output(gguf: Path) -> Path:
    return gguf.with_name(gguf.name.removesuffix(".gguf") + "-hf-bf16")


def convert(gguf: Path, output: Path) -> None:
    # Nothing here may reach a model hub: every file comes from the GGUF on disk.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16
    )
    state = quantised.state_dict()
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings may appear only once in the state dict; anything else is a real loss.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"weights do not match: missing {missing}, unexpected {unexpected}")

    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / DONE).write_text(
        json.dumps({"source": gguf.name, "size": gguf.stat().st_size, "dtype": "bfloat16"}) + "\n"
    )
    shutil.rmtree(output, ignore_errors=True)
    partial.rename(output)


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    gguf = Path(argv[1]).resolve()
    output = Path(argv[2]).resolve() if len(argv) == 3 else default_output(gguf)
    marker = output / DONE
    if marker.exists() and json.loads(marker.read_text()).get("size") == gguf.stat().st_size:
        print(output)
        return 0
    convert(gguf, output)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
