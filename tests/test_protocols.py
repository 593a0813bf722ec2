"""Perplexity protocols: lm-eval's per-document rolling windows and
llama-perplexity's half-scored chunks, checked against lm-eval's own code
and against hand-built windows."""

import json
import math
import random
import re
import textwrap

import pytest

from qbench.data.windows import llama_cpp_windows, rolling_windows


@pytest.mark.parametrize("max_length", [4, 16, 64])
def test_rolling_windows_are_lm_evals_own(max_length):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = random.Random(max_length)
    documents = [[rng.randrange(1000) for _ in range(n)] for n in (1, 3, max_length, max_length + 1, 5 * max_length + 3)]
    ours = rolling_windows(documents, max_length, prefix_id=7)
    theirs = [make_disjoint_window(pair) for doc in documents
              for pair in get_rolling_token_windows(doc, prefix_token=7, max_seq_len=max_length, context_len=1)]
    assert len(ours) == len(theirs)
    for window, (context, continuation) in zip(ours, theirs):
        # lm-eval feeds (context + continuation)[:-1] and scores the continuation.
        assert list(window.input_ids) == context + continuation
        assert window.n_scored == len(continuation)
        assert len(window.input_ids) - 1 <= max_length
    assert sum(w.n_scored for w in ours) == sum(map(len, documents))  # every token scored once
    assert ours[-1].span[1] == sum(map(len, documents))


def test_llama_cpp_chunks_score_the_second_half_behind_a_bos():
    tokens = list(range(100, 135))  # 35 tokens; with BOS 36: four chunks of 8, the rest dropped
    windows = llama_cpp_windows(tokens, 8, bos_id=1)
    assert len(windows) == 4
    assert windows[0].input_ids == (1, 100, 101, 102, 103, 104, 105, 106)
    assert windows[1].input_ids == (1,) + tuple(range(108, 115))  # its first token (107) became BOS
    assert all(w.n_scored == 3 for w in windows)  # targets after position n_ctx/2 = 4
    # Scored targets are the last three tokens of each chunk; spans index `tokens`.
    assert [w.span for w in windows] == [(4, 7), (12, 15), (20, 23), (28, 31)]
    assert [tokens[s] for s in range(*windows[1].span)] == list(windows[1].input_ids[-3:])
    plain = llama_cpp_windows(tokens, 8, bos_id=None)  # a tokenizer that adds no BOS
    assert len(plain) == 4 and plain[0].input_ids == tuple(range(100, 108)) and plain[0].span == (5, 8)


def test_stride_belongs_to_the_stream_protocol_only():
    from qbench.data.suites import PerplexitySpec

    with pytest.raises(ValueError, match="stride applies to the stream protocol only"):
        PerplexitySpec(corpus={"source": "builtin:pydoc-topics"}, protocol="llama.cpp", stride=8)


DOCS = ["The quick brown fox jumps over the lazy dog. " * 9,
        "Python is a programming language that lets you work quickly.\nIt has lists, dicts and sets.",
        "Short one.",
        "Numbers 1, 2, 3 and   spaces\tand tabs " * 6]


def test_lm_eval_rolling_matches_lm_eval_on_the_same_documents(tiny_model, tmp_path):
    """Word perplexity and bits per byte under protocol lm-eval-rolling are
    lm-eval's own figures for its HF model (same model, documents and
    max_length), not just close to them."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import qbench
    from qbench.execute.results import ResultStore

    lm = HFLM(pretrained=str(tiny_model), device="cpu", max_length=32, batch_size=4, dtype="float32")
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                for i, d in enumerate(DOCS)]
    ll = lm.loglikelihood_rolling(requests)
    words = sum(len(re.split(r"\s+", d)) for d in DOCS)
    n_bytes = sum(len(d.encode()) for d in DOCS)
    word_ppl, bpb = math.exp(-sum(ll) / words), -sum(ll) / n_bytes / math.log(2)

    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    suite = tmp_path / "rolling.yaml"
    suite.write_text(textwrap.dedent("""
        name: rolling
        perplexity:
          corpus: {source: docs.jsonl}
          protocol: lm-eval-rolling
          max_length: 32
          max_tokens: 100000
          batch_size: 3
    """))
    df = qbench.run(model=str(tiny_model), suite=str(suite), backends=["fp:fp32"], device="cpu",
                    output_dir=str(tmp_path / "out"))
    record = ResultStore(df.attrs["run_dir"]).latest()["fp:fp32"]
    assert record.ok, record.error
    assert record.value("word_perplexity") == pytest.approx(word_ppl, rel=1e-5)
    assert record.value("bits_per_byte") == pytest.approx(bpb, rel=1e-5)
    assert record.value("byte_perplexity") == pytest.approx(2 ** bpb, rel=1e-5)  # lm-eval's byte_perplexity
    # The BOS the windows held is lm-eval's prefix token, not the suite's "none".
    assert record.workload["perplexity_bos"].startswith("lm-eval's prefix token")


def test_llama_cpp_protocol_on_uniform_logits_gives_the_vocabulary_size(tiny_model, tmp_path):
    """Closed form: a model with uniform logits has perplexity V under any
    protocol; llama.cpp's scores n_ctx - 1 - n_ctx/2 tokens per full chunk."""
    import qbench
    from qbench.data.suites import load_suite
    from qbench.data.workload import Workload
    from qbench.execute.results import ResultStore
    from qbench.sdk.hf import load_tokenizer
    from tests.conftest import FAKE_PLUGINS

    suite = tmp_path / "llama.yaml"
    suite.write_text(textwrap.dedent("""
        name: llama
        perplexity:
          corpus: {source: "builtin:pydoc-topics", documents: [0.0, 0.3]}
          protocol: llama.cpp
          max_length: 64
          max_tokens: 1000
          batch_size: 4
    """))
    df = qbench.run(model=str(tiny_model), suite=str(suite), backends=["fake:uniform"], device="cpu",
                    plugin_dirs=(str(FAKE_PLUGINS),), output_dir=str(tmp_path / "out"))
    record = ResultStore(df.attrs["run_dir"]).latest()["fake:uniform"]
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert record.value("perplexity") == pytest.approx(vocab, rel=1e-6)
    work = Workload(load_suite(str(suite)), load_tokenizer(str(tiny_model)))
    chunks = (len(work.stream) + work.tokenizer_adds_bos) // 64
    assert record.metrics["perplexity"].n == chunks * (64 - 1 - 32) == 15 * 31
    assert record.workload["perplexity_protocol"] == "llama.cpp"
