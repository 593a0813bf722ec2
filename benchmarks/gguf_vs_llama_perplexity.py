"""qbench's KLD for GGUF types beside llama.cpp's own ``llama-perplexity
--kl-divergence``, on the same text, chunks and files.

    .venv/bin/python benchmarks/gguf_vs_llama_perplexity.py --llama-perplexity PATH
    .venv/bin/python benchmarks/gguf_vs_llama_perplexity.py --llama-perplexity PATH --types q8_0,q4_k_m,q4_0 --chunks 32
    .venv/bin/python benchmarks/gguf_vs_llama_perplexity.py --llama-perplexity PATH --types q8_0 --caches q8_0,q4_0

``llama-perplexity`` is not in any wheel: build it from the llama.cpp that
llama-cpp-python vendors (the same kernels the ``gguf`` backend runs)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp
    CFLAGS="-mno-amx-tile -mno-amx-int8" CXXFLAGS="-mno-amx-tile -mno-amx-int8" cmake -B build -DLLAMA_CURL=OFF
    cmake --build build --target llama-perplexity -j

What each side does:
- qbench runs ``fp:fp32`` (the baseline, in PyTorch), ``gguf:f32`` and the
  types asked for, under ``protocol: llama.cpp`` (chunks of ``--ctx``
  tokens, the second half of each scored), its KLD over the baseline's top
  ``--top-k`` tokens and the rest of the mass as one bucket (a lower bound
  that tightens as k grows; llama.cpp's is over the whole vocabulary, from
  base log-probabilities it stores in 16 bits).
- llama.cpp computes its base from the F32 GGUF that qbench wrote (run by
  llama.cpp, not by PyTorch: the two bases differ by llama.cpp's float16
  KV cache, which the ``gguf:f32`` row measures), then each quantized file
  that qbench wrote, against it.
- ``--caches``: each type again with its KV cache quantized, qbench's
  ``kv_cache=`` beside llama-perplexity's ``-ctk``/``-ctv`` with flash
  attention on (``-fa on``, as qbench sets it for a quantized cache); the
  base stays F32 with llama.cpp's float16 cache.
- The text is the first paragraphs of CPython's pydoc reference, written so
  that qbench's blank-line split and llama.cpp's whole-file read give the
  same tokens (the converter names GPT-2's pre-tokenizer; the script checks
  the token counts agree).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import textwrap
from pathlib import Path


def write_text(path: Path, tokens_needed: int, tokenizer) -> None:
    """Whole paragraphs of pydoc topics, joined by blank lines, until the
    text holds ``tokens_needed`` tokens."""
    from pydoc_data.topics import topics

    paragraphs, count = [], 0
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            if para.strip():
                paragraphs.append(para.strip())
                count += len(tokenizer(para.strip(), add_special_tokens=False)["input_ids"]) + 1
        if count > tokens_needed * 1.1:
            break
    path.write_text("\n\n".join(paragraphs))


def suite(folder: Path, ctx: int, chunks: int, top_k: int) -> Path:
    path = folder / "gguf-vs-llama-cpp.yaml"
    path.write_text(textwrap.dedent(f"""
        name: gguf-vs-llama-cpp
        bos: none
        perplexity:
          corpus: {{source: text.txt}}
          max_tokens: {ctx * chunks}
          max_length: {ctx}
          batch_size: 4
          protocol: llama.cpp
        fidelity: {{top_k: {top_k}}}
    """))
    return path


def llama_perplexity(binary: str, model: str, text: Path, ctx: int, chunks: int, threads: int, *extra: str) -> str:
    command = [binary, "-m", model, "-f", str(text), "-c", str(ctx), "-b", str(ctx), "--chunks", str(chunks),
               "-t", str(threads), *extra]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama-perplexity failed ({' '.join(command)}):\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def number(pattern: str, output: str) -> tuple[float, float]:
    found = re.search(pattern + r"\s*:?\s*([-\d.]+)\s*(?:±|\+/-)\s*([-\d.]+)", output)
    if not found:
        raise SystemExit(f"no '{pattern}' in llama-perplexity's output")
    return float(found.group(1)), float(found.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-perplexity", required=True, help="path of the llama-perplexity binary")
    parser.add_argument("--types", default="q8_0,q4_k_m", help="gguf variants, comma-separated")
    parser.add_argument("--caches", default="", help="KV cache types to run each type with too (q8_0,q4_0)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top-k", type=int, default=4096, help="baseline tokens qbench's KLD keeps apart")
    parser.add_argument("--model", default=None, help="a Hugging Face Llama folder (default: the embedded model)")
    args = parser.parse_args()

    import torch

    from qbench.api import run
    from qbench.sdk.hf import load_tokenizer
    from qbench.sdk.models import DEFAULT_MODEL, resolve_model

    model = resolve_model(args.model or DEFAULT_MODEL)
    threads = args.threads or torch.get_num_threads()
    tokenizer = load_tokenizer(model.path, False)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    # (row name, qbench cell, llama-perplexity's extra arguments)
    rows_asked = [("f32", "gguf:f32", ())] + [(t, f"gguf:{t}", ()) for t in types] + [
        (f"{t} kv {c}", f"gguf:{t}:kv_cache={c}", ("-ctk", c, "-ctv", c, "-fa", "on")) for t in types for c in caches
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = folder / "text.txt"
        write_text(text, args.ctx * args.chunks, tokenizer)
        run(model=args.model or DEFAULT_MODEL, suite=str(suite(folder, args.ctx, args.chunks, args.top_k)),
            backends=["fp:fp32", *[cell for _, cell, _ in rows_asked]], output_dir=str(folder / "results"),
            run_id="side-by-side", threads=threads)
        records = {}
        for line in (folder / "results" / "side-by-side" / "results.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["status"] != "ok":
                raise SystemExit(f"{record['cell']} failed: {record.get('error')}")
            records[record["cell"]] = record
        base_file = records["gguf:f32"]["session"]["file"]
        base = llama_perplexity(args.llama_perplexity, base_file, text, args.ctx, args.chunks, threads,
                                "--kl-divergence-base", str(folder / "base.kld"))
        found = re.search(r"computing over (\d+) chunks|calculating perplexity over (\d+) chunks", base)
        llama_ppl = number(r"Final estimate: PPL =", base)
        rows = []
        for name, cell, extra in rows_asked:
            record = records[cell]
            metrics = record["metrics"]
            output = llama_perplexity(args.llama_perplexity, record["session"]["file"], text, args.ctx, args.chunks,
                                      threads, "--kl-divergence-base", str(folder / "base.kld"), "--kl-divergence",
                                      *extra)
            rows.append((name, metrics["kld"]["value"], metrics["kld"]["stderr"], *number(r"Mean\s+KLD", output),
                         metrics["perplexity"]["value"], number(r"Mean PPL\(Q\)", output)[0]))
        fp32 = records["fp:fp32"]["metrics"]
        their_chunks = next((g for g in found.groups() if g), "?") if found else "?"
        print(f"text: {text.stat().st_size} bytes; qbench scored {fp32['perplexity']['n']} tokens in {args.chunks} "
              f"chunks of {args.ctx}; llama.cpp: {their_chunks} chunks")
        print(f"baseline PPL: qbench fp32 (PyTorch) {fp32['perplexity']['value']:.4f}, llama.cpp F32 "
              f"{llama_ppl[0]:.4f} ± {llama_ppl[1]:.4f}")
        print("| type | qbench KLD | llama-perplexity KLD | ratio | qbench PPL | llama.cpp PPL |")
        print("|---|---|---|---|---|---|")
        for name, ours, ours_err, theirs, theirs_err, ppl, their_ppl in rows:
            ratio = f"{ours / theirs:.3f}" if theirs > 0 else "-"
            print(f"| {name} | {ours:.6f} ± {ours_err:.6f} | {theirs:.6f} ± {theirs_err:.6f} | {ratio} | {ppl:.4f} | "
                  f"{their_ppl:.4f} |")


if __name__ == "__main__":
    main()
