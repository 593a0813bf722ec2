"""qbench and lm-evaluation-harness on the same work: the same model, the
same documents, rolling loglikelihoods with the same max_length, batch size
and device. Prints both sides' word perplexity and bits per byte (qbench
under ``protocol: lm-eval-rolling``), their relative difference, and the
throughput of each (scored tokens per second) with the ratio.

    .venv/bin/python benchmarks/lm_eval_side_by_side.py                # embedded model, CPython's LICENSE in 4 documents
    .venv/bin/python benchmarks/lm_eval_side_by_side.py --documents pydoc:100 --max-length 1024 --batch-size 8 --device cuda --dtype bf16
    .venv/bin/python benchmarks/lm_eval_side_by_side.py --tasks lm-eval    # a suite's lm_eval tasks, both engines

Each side runs the whole work once untimed (a warm-up: on a GPU each new
batch shape pays for its kernel choices once), then ``--repeats`` times
timed; the median is reported with the range. qbench's pass is timed two
ways: plain (what a candidate pays, scoring against nothing) and as a
baseline (also keeping the top-k reference for KLD).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import torch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # qbench's fp variants, lm-eval's dtype names


def documents(spec: str) -> list[str]:
    """``license``: CPython's LICENSE.txt in 4 parts of whole paragraphs;
    ``pydoc:N``: the first N topics of CPython's pydoc reference."""
    if spec == "license":
        paragraphs = Path(sysconfig.get_paths()["stdlib"], "LICENSE.txt").read_text().split("\n\n")
        size = math.ceil(len(paragraphs) / 4)
        return ["\n\n".join(paragraphs[i: i + size]) for i in range(0, len(paragraphs), size)]
    if spec.startswith("pydoc:"):
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)][: int(spec.split(":")[1])]
    raise SystemExit(f"unknown --documents {spec}: use license or pydoc:N")


def lm_eval_side(path: str, docs: list[str], args) -> tuple[list[float], list[float]]:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=path, device=args.device, max_length=args.max_length, batch_size=args.batch_size,
              dtype=DTYPES[args.dtype])
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(docs)]
    # Warm-up on the whole work: on a GPU each new batch shape pays for its
    # kernel choices once (cuDNN attention plans), and the two sides feed
    # different shapes.
    lm.loglikelihood_rolling(requests, disable_tqdm=True)
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        ll = lm.loglikelihood_rolling(requests, disable_tqdm=True)
        seconds.append(time.perf_counter() - started)
    return ll, seconds


def qbench_side(path: str, docs: list[str], args, folder: Path):
    from qbench.data.suites import load_suite
    from qbench.data.workload import Workload
    from qbench.metrics.cost import BackendClock
    from qbench.metrics.scoring import reference_from, score_windows
    from qbench.sdk.backend import Artifact
    from qbench.sdk.hf import load_tokenizer
    from qbench.sdk.registry import PluginSettings, load_plugins

    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "suite.yaml").write_text(textwrap.dedent(f"""
        name: side-by-side
        perplexity:
          corpus: {{source: docs.jsonl}}
          protocol: lm-eval-rolling
          max_length: {args.max_length}
          max_tokens: 100000000
          batch_size: {args.batch_size}
    """))
    work = Workload(load_suite(str(folder / "suite.yaml")), load_tokenizer(path))
    windows = work.perplexity_windows
    backend = load_plugins(PluginSettings(allow=("builtin",))).backends["fp"]
    _, config = backend.parse_variant(args.dtype)
    session = BackendClock(backend.load(Artifact(backend="fp", variant=args.dtype, config=config.settings(), path=path,
                                                 model_path=path), args.device))
    score_windows(session, windows, args.batch_size)  # warm-up, as lm-eval's side
    timings: dict[str, list[tuple[float, float]]] = {"plain": [], "baseline": []}
    for _ in range(args.repeats):
        for label, kwargs in (("plain", {}), ("baseline", {"top_k": 512})):
            session.seconds = 0.0
            started = time.perf_counter()
            scores = score_windows(session, windows, args.batch_size, **kwargs)
            if kwargs:
                reference_from(scores)
            timings[label].append((time.perf_counter() - started, session.seconds))
    logprobs = scores.tensor("token_logprobs").double()
    n_bytes, n_words = work.scored_text_stats
    return -logprobs.sum().item(), logprobs.numel(), n_bytes, n_words, timings


REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class RequestClock:
    """Seconds spent inside an lm-eval model's request methods: the work the
    two engines share, apart from lm-eval's task building, which both sides
    go through and which takes most of a small run."""

    def __init__(self, owner) -> None:
        self.seconds = 0.0
        for name in REQUEST_METHODS:
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def tasks_side_by_side(path: str, suite_name: str, args) -> None:
    """A suite's lm_eval tasks through lm-eval's HF model and through
    qbench's model over the fp session of --dtype: every figure, and the time each took."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from qbench.cell.lm_eval_engine import _session_lm_class, evaluate, sandboxed_templates, task_specs
    from qbench.data.suites import load_suite
    from qbench.sdk.backend import Artifact
    from qbench.sdk.hf import load_tokenizer
    from qbench.sdk.registry import PluginSettings, load_plugins

    suite = load_suite(suite_name)
    spec = suite.lm_eval
    lm = HFLM(pretrained=path, device=args.device, max_length=spec.max_length or args.max_length,
              batch_size=spec.batch_size, dtype=DTYPES[args.dtype])
    their_clock = RequestClock(lm)
    started = time.perf_counter()
    with sandboxed_templates():
        theirs = lm_eval.simple_evaluate(model=lm, tasks=task_specs(spec, suite, False), limit=spec.limit,
                                         log_samples=False, bootstrap_iters=spec.bootstrap_iters)["results"]
    lm_seconds = time.perf_counter() - started
    backend = load_plugins(PluginSettings(allow=("builtin",))).backends["fp"]
    _, config = backend.parse_variant(args.dtype)
    session = backend.load(Artifact(backend="fp", variant=args.dtype, config=config.settings(), path=path,
                                    model_path=path), args.device)
    our_clock = RequestClock(_session_lm_class())  # qbench builds its model inside evaluate()
    started = time.perf_counter()
    ours = evaluate(session, load_tokenizer(path), spec, suite, False, spec.max_length or args.max_length)
    seconds = time.perf_counter() - started
    for task, found in ours.items():
        for name, (value, _) in found["metrics"].items():
            key = name if "[" not in name else name.replace("[", ",").rstrip("]")
            reference = theirs[task].get(key if "," in key else f"{key},none")
            print(f"{task} {name}: lm-eval {reference}, qbench {value}, same: {reference == value}")
    print(f"whole runs: lm-eval {lm_seconds:.1f} s, qbench {seconds:.1f} s: {lm_seconds / seconds:.2f}x")
    print(f"in the model's request methods: lm-eval {their_clock.seconds:.1f} s, qbench {our_clock.seconds:.1f} s: "
          f"{their_clock.seconds / our_clock.seconds:.2f}x")


def main() -> None:
    from qbench.sdk.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--documents", default="license")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="the weights' dtype on both sides")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per side (median and range printed)")
    parser.add_argument("--tasks", metavar="SUITE", help="compare a suite's lm_eval tasks instead of perplexity")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model).path
    if args.tasks:
        return tasks_side_by_side(path, args.tasks, args)
    docs = documents(args.documents)
    ll, lm_seconds = lm_eval_side(path, docs, args)
    with tempfile.TemporaryDirectory() as tmp:
        nll, tokens, n_bytes, n_words, timings = qbench_side(path, docs, args, Path(tmp))
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    raw_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"{len(docs)} documents, {tokens} scored tokens, {raw_bytes} bytes, {words} words; max_length "
          f"{args.max_length}, batch {args.batch_size}, {args.device}, {args.dtype}, {torch.get_num_threads()} threads")
    theirs = {"word_perplexity": math.exp(-sum(ll) / words), "bits_per_byte": -sum(ll) / raw_bytes / math.log(2)}
    ours = {"word_perplexity": math.exp(nll / n_words), "bits_per_byte": nll / n_bytes / math.log(2)}
    for name in theirs:
        print(f"{name}: lm-eval {theirs[name]:.6f}, qbench {ours[name]:.6f}, "
              f"difference {100 * (ours[name] / theirs[name] - 1):+.4f}%")
    lm_median = statistics.median(lm_seconds)
    print(f"lm-eval: {spread(lm_seconds, tokens)}")
    for label, passes in timings.items():
        walls, forwards = zip(*passes)
        seconds, forward = statistics.median(walls), statistics.median(forwards)
        print(f"qbench {label} pass: {spread(list(walls), tokens)}, "
              f"{lm_median / seconds:.2f}x lm-eval (medians); the model's forward passes {forward:.2f} s "
              f"({100 * forward / seconds:.0f}%): no harness can beat lm-eval by more than "
              f"{lm_median / forward:.2f}x with this model and device")


def spread(seconds: list[float], tokens: int) -> str:
    """Median seconds and tokens/s of timed passes, with the range."""
    rates = sorted(tokens / s for s in seconds)
    return (f"{statistics.median(seconds):.2f} s, {statistics.median(rates):.0f} tokens/s "
            f"(median of {len(seconds)}; {rates[0]:.0f}-{rates[-1]:.0f})")


if __name__ == "__main__":
    main()
