"""Hugging Face Llama folder -> GGUF (float32), for the ``gguf`` backend.

llama.cpp's own converter (``convert_hf_to_gguf.py``) is a script in its
source tree that no wheel installs, so the ``gguf`` backend writes the file
itself with gguf-py, llama.cpp's own Python library: its tensor name map and
writer do the work, and only what it leaves to the converter lives here (the
rotary permutation of q/k and the vocabulary arrays).

Llama-architecture models only (``model_type: llama``, default rope, no
biases): the family of the embedded model. Anything else is refused with the
way around it (convert with llama.cpp, then ``-b gguf:prequantized:path=``).

The tokenizer is written so that llama.cpp can load the file and split text
as the Hugging Face tokenizer does where its pre-tokenizer is one llama.cpp
names (``pre_tokenizer``); qbench itself never uses it, because the harness
tokenizes and hands llama.cpp token ids, like every other backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qbench.sdk import QBenchError

#: Fields of a Llama config this converter does not translate; a model that
#: sets them is refused rather than converted wrongly.
_UNSUPPORTED = {"attention_bias": False, "mlp_bias": False}


def permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from Hugging Face's rotary layout (two halves per head) to
    llama.cpp's (interleaved pairs), as llama.cpp's converter does."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def check_convertible(model_path: Path) -> dict[str, Any]:
    """The model's config, or a QBenchError saying why it cannot be converted."""
    config = json.loads((model_path / "config.json").read_text())
    fix = "convert it with llama.cpp's convert_hf_to_gguf.py and pass the file as -b gguf:prequantized:path=FILE.gguf"
    if config.get("model_type") != "llama":
        raise QBenchError(
            f"gguf: qbench converts Llama-architecture models only, not '{config.get('model_type')}': " + fix
        )
    for key, expected in _UNSUPPORTED.items():
        if config.get(key, expected) != expected:
            raise QBenchError(
                f"gguf: the model sets {key}={config[key]}, which qbench's converter does not translate: {fix}"
            )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QBenchError(
            f"gguf: rope type '{rope.get('rope_type', rope.get('type'))}' is not converted by qbench: " + fix
        )
    if not (model_path / "tokenizer.json").is_file():
        raise QBenchError(
            f"gguf: {model_path} has no tokenizer.json (a fast tokenizer), which the GGUF vocabulary "
            "is written from: " + fix
        )
    return config


def _rope_theta(config: dict[str, Any]) -> float:
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def pre_tokenizer(spec) -> str:
    """llama.cpp's name for the text splitting of a tokenizer.json
    ``pre_tokenizer``: ``gpt-2`` for byte-level BPE with GPT-2's regex alone,
    ``smollm`` for the same after splitting every digit, else ``default``."""

    def is_gpt2(step) -> bool:
        return (
            bool(step)
            and step.get("type") == "ByteLevel"
            and step.get("use_regex", True)
            and not step.get("add_prefix_space", False)
        )

    if is_gpt2(spec):
        return "gpt-2"
    steps = (spec or {}).get("pretokenizers", []) if (spec or {}).get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") and is_gpt2(steps[1]):
        return "smollm"
    return "default"


def write_vocabulary(writer, model_path: Path, vocab_size: int) -> int:
    """A byte-level BPE vocabulary (gpt2 style) from tokenizer.json; returns
    how many ids were padded to reach the model's vocabulary size, and the
    pre-tokenizer name written."""
    import gguf

    from qbench.sdk import adds_bos, load_tokenizer

    spec = json.loads((model_path / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise QBenchError(
            f"gguf: the tokenizer of {model_path} is not byte-level BPE, the only kind qbench writes to "
            "GGUF: convert it with llama.cpp's convert_hf_to_gguf.py and pass the file as "
            "-b gguf:prequantized:path=FILE.gguf"
        )
    tokens: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    padded = 0
    for i in range(vocab_size):
        if i not in tokens:  # the embedding has rows no token uses
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
            padded += 1
    ids = range(vocab_size)
    writer.add_tokenizer_model("gpt2")
    pre = pre_tokenizer(spec.get("pre_tokenizer"))
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([tokens[i] for i in ids])
    writer.add_token_types([int(types[i]) for i in ids])
    special = gguf.SpecialVocab(model_path, load_merges=True, n_vocab=vocab_size)
    # What the tokenizer does, not what its config may leave unsaid:
    # llama.cpp's tools (llama-perplexity) then see the same tokens.
    special.add_special_token["bos"] = adds_bos(load_tokenizer(str(model_path)))
    special.add_to_gguf(writer, quiet=True)
    return padded, pre


def convert_llama(model_path: Path, out: Path) -> dict[str, Any]:
    """Write ``out`` (GGUF, every tensor float32) from the Llama model in
    ``model_path``. Returns facts to record."""
    import gguf
    from safetensors import safe_open

    config = check_convertible(model_path)
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    arch = gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, layers)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(str(config.get("_model_name_or_path") or model_path.name))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    padded, pre = write_vocabulary(writer, model_path, config["vocab_size"])
    tied = config.get("tie_word_embeddings", False)
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise QBenchError(f"gguf: {model_path} has no safetensors weights to convert")
    written = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue  # llama.cpp reads the output head from token_embd when output is absent
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                target = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise QBenchError(
                        f"gguf: no GGUF name for tensor '{name}' of {path.name}: the model is not a plain Llama"
                    )
                data = handle.get_tensor(name).float().numpy()
                if name.endswith("self_attn.q_proj.weight"):
                    data = permute_rotary(data, heads)
                elif name.endswith("self_attn.k_proj.weight"):
                    data = permute_rotary(data, kv_heads)
                writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
                written += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "converter": f"qbench (gguf-py {_gguf_version()})",
        "tensors": written,
        "padded_vocab": padded,
        "tokenizer_pre": pre,
    }


def _gguf_version() -> str:
    from qbench.sdk import package_version

    return str(package_version("gguf"))
