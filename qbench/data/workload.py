"""Turns a suite into token ids, identically in every worker: the harness owns
the tokenizer and the BOS policy, backends only ever see ids."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import torch

from qbench.core.errors import QBenchError
from qbench.data.corpus import corpus_stream, load_documents
from qbench.data.lm_eval_tasks import lm_eval_encode, prefix_token_id
from qbench.data.suites import Suite
from qbench.data.tasks import load_items, request_windows
from qbench.data.windows import Window, llama_cpp_windows, make_windows, rolling_windows, windows_hash
from qbench.sdk.hf import adds_bos

OVERLAP_NGRAM = 13


def max_positions(model_path: str) -> Optional[int]:
    """The longest sequence the model's config allows, if it says."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


@dataclass
class Workload:
    suite: Suite
    tokenizer: Any

    @property
    def bos_id(self) -> Optional[int]:
        return self.tokenizer.bos_token_id

    def _bos_prefix(self) -> list[int]:
        return [self.bos_id] if self.suite.bos != "none" and self.bos_id is not None else []

    @cached_property
    def documents(self) -> list[str]:
        return load_documents(self.suite.perplexity.corpus, self.suite)

    @cached_property
    def rolling_documents(self) -> list[tuple[str, list[int]]]:
        """lm-eval-rolling: whole documents, each tokenized as lm-eval's HF
        model does (the tokenizer's own special tokens, unless the text
        already starts with the prefix token), up to ``max_tokens``."""
        _ = self.rolling_prefix_id  # no prefix token: a clear error first
        out: list[tuple[str, list[int]]] = []
        total = 0
        for doc in self.documents:
            ids = lm_eval_encode(self.tokenizer, doc)
            if out and total + len(ids) > self.suite.perplexity.max_tokens:
                break
            out.append((doc, ids))
            total += len(ids)
        return out

    @property
    def rolling_prefix_id(self) -> int:
        """lm-eval's prefix token for rolling loglikelihoods: BOS, else EOS."""
        prefix = prefix_token_id(self.tokenizer)
        if prefix is None:
            raise QBenchError(
                f"{self.suite.file}: protocol lm-eval-rolling needs a BOS or EOS token and this "
                "model's tokenizer has neither: use protocol stream"
            )
        return prefix

    @property
    def tokenizer_adds_bos(self) -> bool:
        """Whether the tokenizer puts BOS first by itself (llama.cpp's add_bos)."""
        return adds_bos(self.tokenizer)

    @cached_property
    def stream(self) -> list[int]:
        """The corpus tokens, shared by perplexity windows and latency prompts
        (lm-eval-rolling: its documents' tokens end to end)."""
        spec = self.suite.perplexity
        if spec.protocol == "lm-eval-rolling":
            return [t for _, ids in self.rolling_documents for t in ids]
        return corpus_stream(self.tokenizer, self.documents, spec.max_tokens)

    @cached_property
    def context_windows(self) -> dict[int, list[Window]]:
        """The perplexity windows at every length of the suite (one, unless
        ``max_length`` lists several), cut from the same tokens by the same
        protocol."""
        spec = self.suite.perplexity
        out = {}
        for length in spec.lengths:
            if spec.protocol == "lm-eval-rolling":
                documents = [ids for _, ids in self.rolling_documents]
                out[length] = rolling_windows(documents, length, self.rolling_prefix_id)
            elif spec.protocol == "llama.cpp":
                out[length] = llama_cpp_windows(self.stream, length, self.bos_id if self.tokenizer_adds_bos else None)
            else:
                out[length] = make_windows(self.stream, length, spec.stride, self.suite.bos, self.bos_id)
        return out

    @property
    def perplexity_windows(self) -> list[Window]:
        """The windows of the row's own perplexity and fidelity: the first length's."""
        return self.context_windows[self.suite.perplexity.lengths[0]]

    def prepare(self) -> None:
        """Tokenize everything the quality phases use, up front: tokenizing is
        preparation, not time the harness adds around backend calls."""
        if self.suite.perplexity:
            _ = self.context_windows, self.scored_text_stats
        _ = self.tasks
        if self.suite.generation:
            _ = self.generation_prompts

    @cached_property
    def scored_text_stats(self) -> tuple[int, int]:
        """(bytes, words) of the text of exactly the scored tokens; under
        lm-eval-rolling, of the documents as lm-eval counts them (UTF-8
        bytes, and pieces of ``re.split(r"\\s+", text)``)."""
        if self.suite.perplexity.protocol == "lm-eval-rolling":
            docs = [doc for doc, _ in self.rolling_documents]
            return sum(len(d.encode("utf-8")) for d in docs), sum(len(re.split(r"\s+", d)) for d in docs)
        stream = self.stream
        n_bytes = n_words = 0
        for w in self.perplexity_windows:
            text = self.tokenizer.decode(stream[w.span[0] : w.span[1]])
            n_bytes += len(text.encode("utf-8"))
            n_words += len(text.split())
        return n_bytes, n_words

    @cached_property
    def tasks(self) -> list[tuple[str, list[dict], list[Window]]]:
        out = []
        bos = self._bos_prefix()
        for task in self.suite.tasks:
            items = load_items(self.suite.resolve(task.path), task.limit)
            out.append(
                (
                    task.name,
                    items,
                    request_windows(
                        self.tokenizer, items, bos[0] if bos else None, lm_eval_rule=self.suite.task_bos == "lm-eval"
                    ),
                )
            )
        return out

    @cached_property
    def generation_prompts(self) -> list[torch.Tensor]:
        bos = self._bos_prefix()
        return [
            torch.tensor([bos + self.tokenizer(p, add_special_tokens=False)["input_ids"]])
            for p in self.suite.generation.prompts
        ]

    def latency_prompt(self, batch_size: Optional[int] = None, tokens: Optional[int] = None) -> torch.Tensor:
        """Real corpus tokens (not random ids), repeated over the batch (the
        suite's first batch size and prompt length unless given)."""
        spec = self.suite.latency
        tokens = tokens or spec.prompt_lengths[0]
        ids = (self._bos_prefix() + self.stream)[:tokens]
        if len(ids) < tokens:
            raise QBenchError(
                f"the corpus has only {len(ids)} tokens, the latency workload needs {tokens}: "
                "lower latency.prompt_tokens"
            )
        return torch.tensor([ids] * (batch_size or spec.batch_sizes[0]))

    def calibration(self, name: str = "default") -> tuple[Optional[list[list[int]]], Optional[str]]:
        """Calibration samples (token ids) of the set ``name`` and their hash,
        from data kept apart from the evaluation data."""
        spec = self.suite.calibration_spec(name)
        if spec is None:
            return None, None
        docs = load_documents(spec.corpus, self.suite)
        stream = corpus_stream(self.tokenizer, docs, spec.samples * spec.seq_len)
        samples = [stream[i : i + spec.seq_len] for i in range(0, len(stream), spec.seq_len)]
        samples = [s for s in samples if len(s) == spec.seq_len][: spec.samples]
        digest = hashlib.sha256(json.dumps(samples).encode()).hexdigest()[:16]
        return samples, digest

    def calibration_overlap(self, samples: list[list[int]], n: int = OVERLAP_NGRAM) -> float:
        """Share of the calibration's token n-grams that also occur in the
        evaluation data (perplexity corpus, task requests, generation
        prompts): calibrating on evaluation text flatters calibrated variants.
        13-grams, as in lm-evaluation-harness's decontamination."""

        def grams(ids) -> set:
            ids = tuple(ids)
            return {ids[i : i + n] for i in range(len(ids) - n + 1)}

        evaluation: set = set()
        if self.suite.perplexity:
            evaluation |= grams(self.stream)
        for _, _, windows in self.tasks:
            for window in windows:
                evaluation |= grams(window.input_ids)
        if self.suite.generation:
            for prompt in self.generation_prompts:
                evaluation |= grams(prompt[0].tolist())
        calibration = [g for sample in samples for g in grams(sample)]
        return sum(g in evaluation for g in calibration) / len(calibration) if calibration else 0.0

    def check(self, limit: Optional[int]) -> None:
        """What can only be checked with the tokenizer, before any cell:
        scored tokens exist, and no sequence the harness builds is longer
        than the model's positions (``limit``), where scores would be
        silently wrong."""

        def fits(length: int, what: str, fix: str) -> None:
            if limit is not None and length > limit:
                raise QBenchError(
                    f"{self.suite.file}: {what} needs {length:,} positions but the model has {limit:,}: {fix}"
                )

        spec = self.suite.perplexity
        if spec:
            for length, windows in self.context_windows.items():
                scored = sum(w.n_scored for w in windows)
                if scored < 2:
                    raise QBenchError(
                        f"{self.suite.file}: the perplexity corpus gives {scored} scored token(s) at "
                        f"max_length {length} ({len(self.stream)} tokens in all): use a longer corpus or "
                        "raise perplexity.max_tokens"
                    )
                # The model is fed every token of a window but its last (only a target).
                fits(max(len(w.input_ids) for w in windows) - 1, f"perplexity.max_length {length}", "lower it")
        for name, _, windows in self.tasks:
            fits(
                max(len(w.input_ids) for w in windows) - 1,
                f"task '{name}' (its longest request)",
                "shorten its contexts or drop the task",
            )
        if self.suite.generation:
            longest = max(p.shape[1] for p in self.generation_prompts)
            fits(
                longest + self.suite.generation.max_new_tokens,
                "generation (longest prompt + max_new_tokens)",
                "lower max_new_tokens or shorten the prompts",
            )
        sets = {"calibration": "default"} if self.suite.calibration else {}
        sets.update({f"calibration_sets.{name}": name for name in self.suite.calibration_sets})
        for where, name in sets.items():
            wanted = self.suite.calibration_spec(name)
            samples, _ = self.calibration(name)
            if len(samples) < wanted.samples:
                raise QBenchError(
                    f"{self.suite.file}: the {where} corpus gives {len(samples)} of the "
                    f"{wanted.samples} samples of {wanted.seq_len} tokens asked for: lower "
                    f"{where}.samples or seq_len, or use more text"
                )
            fits(wanted.seq_len, f"{where}.seq_len", "lower it")
        if self.suite.latency:
            lat = self.suite.latency
            available = len(self._bos_prefix()) + len(self.stream)
            longest = max(lat.prompt_lengths)
            if available < longest:
                raise QBenchError(
                    f"{self.suite.file}: latency.prompt_tokens is {longest} but the "
                    f"perplexity corpus gives only {available} tokens: lower it or use more text"
                )
            fits(longest + lat.new_tokens, "latency (prompt_tokens + new_tokens)", "lower them")

    @property
    def perplexity_bos(self) -> str:
        """The BOS the perplexity windows actually hold, in words: the suite's
        ``bos`` applies to the stream protocol only; the others follow their
        tool (lm-eval's prefix token, llama.cpp's per-chunk BOS)."""
        protocol = self.suite.perplexity.protocol
        if protocol == "lm-eval-rolling":
            prefix = self.rolling_prefix_id
            kind = "BOS" if prefix == self.bos_id else "EOS"
            return f"lm-eval's prefix token ({kind}, id {prefix}) before each document's first window"
        if protocol == "llama.cpp":
            return (
                f"BOS (id {self.bos_id}) first in every chunk, as llama-perplexity"
                if self.tokenizer_adds_bos
                else "none (the tokenizer adds no BOS, so llama-perplexity adds none)"
            )
        return {
            "none": "none",
            "document": f"BOS (id {self.bos_id}) before the corpus",
            "window": f"BOS (id {self.bos_id}) before every window",
        }[self.suite.bos]

    def fingerprint(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bos_policy": self.suite.bos, "bos_id": self.bos_id, "task_bos": self.suite.task_bos}
        if self.suite.perplexity:
            protocol = self.suite.perplexity.protocol
            out["perplexity_protocol"] = protocol
            if protocol == "lm-eval-rolling":
                out["perplexity_prefix_id"] = self.rolling_prefix_id
                out["perplexity_documents"] = len(self.rolling_documents)
            elif protocol == "llama.cpp":
                out["perplexity_bos_per_chunk"] = self.tokenizer_adds_bos
            out["perplexity_bos"] = self.perplexity_bos
            out["perplexity_windows"] = windows_hash(self.perplexity_windows)
            out["perplexity_tokens"] = sum(w.n_scored for w in self.perplexity_windows)
            if len(self.context_windows) > 1:
                out["context_windows"] = {str(n): windows_hash(w) for n, w in self.context_windows.items()}
                out["context_tokens"] = {str(n): sum(w.n_scored for w in ws) for n, ws in self.context_windows.items()}
        return out
