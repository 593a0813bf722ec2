"""Corpus sources: local files, and the hub spec's clear errors offline."""

import sys
import types

import pytest

from qbench.core.errors import QBenchError
from qbench.data.corpus import load_documents
from qbench.data.suites import CorpusSpec, Suite


def suite_at(folder) -> Suite:
    return Suite(name="t", root=str(folder))


def test_text_and_jsonl_files_split_into_documents(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\n\nthree\n\nfour")
    assert load_documents(CorpusSpec(source="a.txt", documents=(0.5, 1.0)), suite_at(tmp_path)) == ["three", "four"]
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    assert load_documents(CorpusSpec(source="b.jsonl", text_field="body"), suite_at(tmp_path)) == ["x", "y"]


def test_hub_spec_is_checked_and_offline_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(QBenchError, match="expected hf:DATASET:SPLIT"):
        load_documents(CorpusSpec(source="hf:wikitext"), suite_at(tmp_path))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(QBenchError, match="cannot load corpus 'hf:wikitext:wikitext-2-raw-v1:test'.*offline, use"):
        load_documents(CorpusSpec(source="hf:wikitext:wikitext-2-raw-v1:test"), suite_at(tmp_path))


def test_hub_spec_without_datasets_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(QBenchError, match="pip install datasets"):
        load_documents(CorpusSpec(source="hf:wikitext:test"), suite_at(tmp_path))


def test_calibration_overlapping_evaluation_text_is_measured(tiny_suite, tiny_model):
    from qbench.data.suites import load_suite
    from qbench.data.workload import Workload
    from qbench.sdk.hf import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    apart = Workload(load_suite(tiny_suite), tokenizer)
    samples, _ = apart.calibration()
    assert apart.calibration_overlap(samples) == 0.0
    # Calibrating on the perplexity corpus itself: every 13-gram is shared.
    same = Workload(load_suite(tiny_suite), tokenizer)
    assert same.calibration_overlap([same.stream[:32], same.stream[100:132]]) == 1.0
    # Half of a sample taken from the corpus: about half of its 13-grams.
    mixed = same.stream[200:232] + list(range(5, 37))
    assert 0.3 < same.calibration_overlap([mixed]) < 0.6
