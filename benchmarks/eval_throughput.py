"""Evaluation throughput of the fp32 baseline, and the share of wall time the
harness adds around backend calls. A benchmark that prints figures, not a test.

Two shares are printed: the evaluation pass measured here (the baseline pass,
which also keeps the top-k reference, and a candidate pass scored against
it), and the whole run's, from the records of the newest finished run of the
same model and suite (every cell's measurement phases: perplexity, tasks,
generation, latency), or of ``--run``.

    make bench                      # embedded default model, default suite
    .venv/bin/python benchmarks/eval_throughput.py --model DIR --suite smoke --threads 2
    .venv/bin/python benchmarks/eval_throughput.py --run 20261127-213356-e583
"""

from __future__ import annotations

import argparse
import time

import torch

from qbench.data.suites import load_suite
from qbench.data.workload import Workload
from qbench.metrics.cost import BackendClock
from qbench.metrics.scoring import reference_from, score_windows
from qbench.sdk.backend import Artifact
from qbench.sdk.hf import load_tokenizer
from qbench.sdk.models import resolve_model
from qbench.sdk.registry import PluginSettings, load_plugins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--suite", default="default")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run", help="a finished run whose whole-run harness share to print "
                                      "(default: the newest run of this model and suite)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = resolve_model(args.model)
    suite = load_suite(args.suite)
    work = Workload(suite, load_tokenizer(spec.path))
    windows = work.perplexity_windows
    tokens = sum(len(w.input_ids) for w in windows)
    backend = load_plugins(PluginSettings(allow=("builtin",))).backends["fp"]
    _, config = backend.parse_variant("fp32")
    artifact = Artifact(backend="fp", variant="fp32", config=config.settings(), path=spec.path, model_path=spec.path)
    session = BackendClock(backend.load(artifact, args.device))
    batch = suite.perplexity.batch_size
    print(f"model {spec.name}, suite {suite.name}: {len(windows)} windows, {tokens} tokens, batch {batch}, "
          f"threads {torch.get_num_threads()}, device {args.device}")

    reference = None
    for label, kwargs in (("baseline pass (keeps top-k reference)", {"top_k": suite.fidelity.top_k}),
                          ("candidate pass (KLD against the reference)", None)):
        if kwargs is None:
            kwargs = {"reference": reference}
        session.seconds = 0.0
        start = time.perf_counter()
        scores = score_windows(session, windows, batch, **kwargs)
        wall = time.perf_counter() - start
        if "top_k" in kwargs:
            reference = reference_from(scores)
        overhead = wall - session.seconds
        print(f"{label}: {wall:.1f} s wall, {tokens / wall:.0f} tokens/s; backend {session.seconds:.1f} s, "
              f"harness {overhead:.2f} s = {100 * overhead / wall:.1f}% of wall time")
    session.close()
    run_share(args.run, spec.fingerprint, suite.content_hash())


def run_share(run, model_fingerprint: str, suite_hash: str) -> None:
    """The harness share of a whole run, from its records."""
    from qbench.core.paths import results_dir
    from qbench.execute.results import ResultStore, find_run

    if run:
        folders = [find_run(run)]
    else:
        folders = sorted((p.parent for p in results_dir().glob("*/results.jsonl")), key=lambda p: p.stat().st_mtime)
    for folder in reversed(folders):
        records = [r for r in ResultStore(folder).latest().values() if r.ok]
        if run or (records and all(r.model.fingerprint == model_fingerprint
                                   and r.suite.hash == suite_hash for r in records)):
            break
    else:
        print("whole run: no finished run of this model and suite under the results folder (run `make run`)")
        return
    harness = sum(r.metrics["harness_share"].get("seconds") for r in records)
    backend = sum(r.metrics["harness_share"].get("backend_seconds") for r in records)
    worst = max(records, key=lambda r: r.value("harness_share"))
    print(f"whole run {folder.name} ({len(records)} cells): harness {harness:.1f} s of {harness + backend:.0f} s "
          f"in measurement phases = {100 * harness / (harness + backend):.1f}%; highest cell {worst.cell} "
          f"{100 * worst.value('harness_share'):.1f}%")


if __name__ == "__main__":
    main()
