"""A model of a real shape for GPU speed and memory work, without a download:
a Llama-architecture config (1.07B parameters by default) initialised with
random weights on the GPU, saved as a Hugging Face folder beside a copy of a
tokenizer (SmolLM2's, from the embedded model's converted folder, or any HF
folder given). Random weights: speed and memory are real; quality figures of
such a model mean nothing.

    python benchmarks/make_gpu_model.py OUT_DIR --tokenizer-from DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def copy_tokenizer(source: Path, folder: Path) -> None:
    """The tokenizer files ``source`` has, copied beside a saved model."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, required=True, help="a folder holding tokenizer.json")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(args.out)
    copy_tokenizer(args.tokenizer_from, args.out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters -> {args.out}")


if __name__ == "__main__":
    main()
