"""Evaluation windows: the same token windows for every backend, under one
of three perplexity protocols (``make_windows``: a stream in windows, GPTQ's
and HF's sliding-window protocol; ``rolling_windows``: lm-eval's per-document
rolling windows; ``llama_cpp_windows``: llama-perplexity's half-scored chunks).

A window is ``input_ids`` plus how many of its last targets are scored. Logits
at position p predict ``input_ids[p + 1]``, so a window of n tokens has n - 1
targets and the model is fed its first n - 1 tokens; ``n_scored`` counts from
the end. Each corpus token is scored at most once across windows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import torch

from qbench.core.errors import QBenchError


@dataclass(frozen=True)
class Window:
    input_ids: tuple[int, ...]
    n_scored: int
    #: index range [start, end) of the scored tokens in the corpus stream
    span: tuple[int, int]


def make_windows(
    tokens: list[int],
    max_length: int,
    stride: Optional[int],
    bos_policy: str,
    bos_id: Optional[int],
) -> list[Window]:
    """Windows over ``tokens`` following the GPTQ protocol by default.

    bos_policy "none": no BOS; the first token of the corpus has no context and
    is not scored, nor is the first token of each non-overlapping window.
    "document": BOS before the first token of the corpus only.
    "window": BOS before every window, so every corpus token is scored.
    With ``stride < max_length`` windows overlap and only tokens not scored by
    an earlier window are scored (the sliding-window protocol of HF's docs).
    """
    if bos_policy != "none" and bos_id is None:
        raise QBenchError("the suite asks for a BOS token but this model's tokenizer has none: use bos: none")
    stream = ([bos_id] if bos_policy == "document" else []) + list(tokens)
    offset = 1 if bos_policy == "document" else 0  # stream index -> corpus index
    prefix = [bos_id] if bos_policy == "window" else []
    capacity = max_length - len(prefix)
    step = min(stride or capacity, capacity)
    windows: list[Window] = []
    scored_until = 0 if prefix else 1  # first stream index not yet scored
    begin = 0
    while scored_until < len(stream):
        end = min(begin + capacity, len(stream))
        first = max(scored_until, begin + (0 if prefix else 1))
        if end > first:
            windows.append(Window(tuple(prefix + stream[begin:end]), end - first, (first - offset, end - offset)))
            scored_until = end
        if end == len(stream):
            break
        begin += step
        if not prefix:
            # Non-overlapping windows without a BOS lose their first token's
            # score; the sliding protocol keeps it by overlapping instead.
            scored_until = max(scored_until, begin + 1) if step == capacity else scored_until
    return windows


def rolling_windows(documents: list[list[int]], max_length: int, prefix_id: int) -> list[Window]:
    """lm-evaluation-harness's ``loglikelihood_rolling``, per document: the
    first window is the prefix token plus up to ``max_length`` tokens, every
    one scored; each later window scores the next ``max_length`` tokens with
    the tokens just before them as context, so the model is fed exactly
    ``max_length`` tokens per window (lm-eval's ``get_rolling_token_windows``
    with ``context_len=1``, then ``make_disjoint_window``). Spans index the
    documents' tokens laid end to end."""
    windows: list[Window] = []
    offset = 0
    for tokens in documents:
        first = min(max_length, len(tokens))
        if first:
            windows.append(Window(tuple([prefix_id] + tokens[:first]), first, (offset, offset + first)))
        done = first
        while done < len(tokens):
            end = done + min(len(tokens) - done, max_length)
            # lm-eval's context starts max_length + 1 before the window's end
            # (never before the document's start).
            windows.append(
                Window(tuple(tokens[max(end - max_length - 1, 0) : end]), end - done, (offset + done, offset + end))
            )
            done = end
        offset += len(tokens)
    return windows


def llama_cpp_windows(tokens: list[int], n_ctx: int, bos_id: Optional[int]) -> list[Window]:
    """``llama-perplexity``'s chunks: the stream (with a BOS first when the
    tokenizer adds one, ``bos_id``) cut into ``len // n_ctx`` chunks of
    ``n_ctx`` tokens; each chunk's first token becomes BOS (when there is
    one), and only the second half is scored: the targets after position
    ``n_ctx // 2``, ``n_ctx - 1 - n_ctx // 2`` per chunk. Spans index
    ``tokens`` (BOS excluded)."""
    stream = ([bos_id] if bos_id is not None else []) + list(tokens)
    offset = 1 if bos_id is not None else 0
    first = n_ctx // 2
    windows = []
    for start in range(0, (len(stream) // n_ctx) * n_ctx, n_ctx):
        chunk = stream[start : start + n_ctx]
        if bos_id is not None:
            chunk[0] = bos_id
        windows.append(Window(tuple(chunk), n_ctx - 1 - first, (start + first + 1 - offset, start + n_ctx - offset)))
    return windows


def windows_hash(windows: list[Window]) -> str:
    digest = hashlib.sha256()
    for w in windows:
        digest.update(json.dumps([w.input_ids, w.n_scored]).encode())
    return digest.hexdigest()[:16]


def batches(windows: list[Window], batch_size: int, pad_id: int = 0):
    """Right-padded batches: (input_ids, attention_mask, windows)."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        length = max(len(w.input_ids) for w in chunk)
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, : len(w.input_ids)] = torch.tensor(w.input_ids)
            mask[row, : len(w.input_ids)] = 1
        yield ids, mask, chunk
