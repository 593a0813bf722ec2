"""One forward pass per window, from which every quality metric is derived.

Log-softmax is always taken here in float32, never by a backend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from qbench.data.windows import Window, batches
from qbench.sdk.backend import Session, to_device


@dataclass
class Reference:
    """The baseline's distributions on the scored tokens, stored compactly:
    the top-k log-probabilities and their token ids, the log-probability of
    the actual next token, and the baseline's argmax."""

    topk_logprobs: torch.Tensor  # [N, k] float32, sorted descending
    topk_ids: torch.Tensor  # [N, k] int32 (half the bytes of int64; vocabularies fit)
    token_logprobs: torch.Tensor  # [N] float32

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file(
            {
                "topk_logprobs": self.topk_logprobs.contiguous(),
                "topk_ids": self.topk_ids.contiguous(),
                "token_logprobs": self.token_logprobs.contiguous(),
            },
            str(path),
        )

    @classmethod
    def load(cls, path) -> Reference:
        from safetensors.torch import load_file

        return cls(**load_file(str(path)))


@dataclass
class TokenScores:
    """Per scored token, in window order."""

    token_logprobs: list[torch.Tensor] = field(default_factory=list)  # log q(actual)
    kld: list[torch.Tensor] = field(default_factory=list)  # KL(P_base || Q)
    same_top: list[torch.Tensor] = field(default_factory=list)  # argmax agreement
    tail_mass: list[torch.Tensor] = field(default_factory=list)  # baseline mass outside top-k
    topk_logprobs: list[torch.Tensor] = field(default_factory=list)  # only when building a reference
    topk_ids: list[torch.Tensor] = field(default_factory=list)
    greedy: list[torch.Tensor] = field(default_factory=list)  # argmax == actual (when asked)

    @staticmethod
    def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0)

    def tensor(self, name: str) -> torch.Tensor:
        return self._cat(getattr(self, name))


def kl_against_topk(ref_lp: torch.Tensor, ref_ids: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(P || Q) where P is known through its top-k plus the remaining mass.

    ``lq`` holds log Q at the same token ids as ``ref_ids`` ([N, k]). The k
    tokens are kept and everything else is merged into one "rest" bucket on
    both sides. By the data-processing inequality this is a lower bound of
    the exact KL; the gap is rest_P * KL(P_rest || Q_rest) over the
    renormalised tails, so it vanishes as the tail mass does (the tail mass
    is reported beside the result). Returns (kld, tail_mass_of_P)."""
    # float64: the rest mass is 1 - sum(p), a difference float32 rounds badly.
    ref_lp, lq = ref_lp.double(), lq.double()
    p = ref_lp.exp()
    head = (p * (ref_lp - lq)).sum(-1)
    rest_p = (1.0 - p.sum(-1)).clamp_min(0.0)
    rest_q = (1.0 - lq.exp().sum(-1)).clamp_min(1e-30)
    tail = torch.where(rest_p > 1e-9, rest_p * (rest_p.clamp_min(1e-30).log() - rest_q.log()), torch.zeros_like(rest_p))
    return (head + tail).clamp_min(0.0).float(), rest_p.float()


@torch.inference_mode()
def score_windows(
    session: Session,
    windows: list[Window],
    batch_size: int,
    reference: Optional[Reference] = None,
    top_k: int = 0,
    on_batch: Optional[Callable[[int, int], None]] = None,
    greedy: bool = False,
) -> TokenScores:
    """Run every window once; gather log q(actual) and, given a reference,
    the fidelity statistics; with ``top_k`` also the data for a reference;
    with ``greedy`` whether each actual token is the argmax (lm-eval's
    ``is_greedy``)."""
    # Row of the reference where each window's scored tokens start.
    starts = list(itertools.accumulate((w.n_scored for w in windows), initial=0))
    if reference is not None and starts[-1] != reference.token_logprobs.numel():
        raise ValueError(f"reference has {reference.token_logprobs.numel()} tokens, windows score {starts[-1]}")
    # Longest windows first, as lm-eval orders its requests: batches of
    # similar lengths pad less (task requests and the last window of each
    # document vary). Equal lengths keep their order (a stable sort).
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))
    per_window: list[dict[str, torch.Tensor]] = [{} for _ in windows]
    done = 0
    buffers = _RowBuffers()
    # On a GPU a batch's results reach the host while the next batch runs:
    # the harness never waits for the device between batches, so the GPU is
    # never idle while Python prepares the next one.
    pending: Optional[_InFlight] = None
    for ids, mask, chunk in batches([windows[i] for i in order], batch_size):
        indices = order[done : done + len(chunk)]
        done += len(chunk)
        # A window's last token is only ever a target: its logits would go unused.
        logits = session.logits(ids[:, :-1], mask[:, :-1])
        rows = batch_ref = None
        if reference is not None:
            rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in indices])
            batch_ref = to_device(reference.topk_ids[rows], logits.device)
        parts = _score_batch(logits, to_device(ids, logits.device), chunk, buffers, greedy, top_k, batch_ref)
        del logits
        if pending is not None:
            pending.finish(reference, per_window, on_batch, len(windows))
        pending = _InFlight(parts, rows, indices, [w.n_scored for w in chunk], done)
    if pending is not None:
        pending.finish(reference, per_window, on_batch, len(windows))
    scores = TokenScores()
    for found in per_window:  # back in the windows' own order
        for name, piece in found.items():
            getattr(scores, name).append(piece)
    return scores


def _score_batch(
    logits: torch.Tensor,
    ids: torch.Tensor,
    chunk: list[Window],
    buffers: _RowBuffers,
    greedy: bool,
    top_k: int,
    batch_ref: Optional[torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Per-token quantities of one batch, concatenated in the batch's window
    order, still on the logits' device."""
    parts: dict[str, list[torch.Tensor]] = {
        "token_logprobs": [],
        "topk_logprobs": [],
        "topk_ids": [],
        "lq": [],
        "same_top": [],
        "greedy": [],
    }
    local = 0
    for row, window in enumerate(chunk):
        n = len(window.input_ids)
        # log-softmax in float32 by the harness, whatever dtype the backend
        # returned, on the logits' own device; only gathered values are
        # kept. Row by row: on CPU that measured faster than one call over
        # the batch (cache-friendlier); 32-token slices measured no faster.
        # torch's fused log_softmax beats logsumexp on CPU (6.6 vs 40 ms
        # per 511 x 49,152 row).
        lp = buffers.log_softmax(logits[row, n - 1 - window.n_scored : n - 1])
        targets = ids[row, n - window.n_scored : n]
        parts["token_logprobs"].append(lp.gather(-1, targets[:, None])[:, 0])
        if greedy:
            parts["greedy"].append(lp.argmax(-1) == targets)
        if top_k:
            values, top_ids = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            parts["topk_logprobs"].append(values)
            parts["topk_ids"].append(top_ids.to(torch.int32))
        if batch_ref is not None:
            ref_ids = batch_ref[local : local + window.n_scored].long()
            lq = lp.gather(-1, ref_ids)
            parts["lq"].append(lq)
            parts["same_top"].append(agrees_with_top1(lp, lq, ref_ids))
        local += window.n_scored
    return {k: torch.cat(v) for k, v in parts.items() if v}


class _InFlight:
    """One batch's results on their way to the host: one copy per quantity,
    started at once, waited for only when the next batch is queued."""

    def __init__(
        self,
        parts: dict[str, torch.Tensor],
        rows: Optional[torch.Tensor],
        indices: list[int],
        sizes: list[int],
        done: int,
    ):
        self.parts = {k: v.to("cpu", non_blocking=True) for k, v in parts.items()}  # pinned when from a GPU
        self.copied = None
        gpu = next((v.device for v in parts.values() if v.is_cuda), None)
        if gpu is not None:
            # on the results' own GPU, which need not be the current one
            # when a model is spread over several
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(gpu))
        self.rows, self.indices, self.sizes, self.done = rows, indices, sizes, done

    def finish(
        self,
        reference: Optional[Reference],
        per_window: list[dict[str, torch.Tensor]],
        on_batch: Optional[Callable[[int, int], None]],
        total: int,
    ) -> None:
        batch = self.parts
        if self.copied is not None:
            self.copied.synchronize()
            # Out of page-locked memory, which goes back to the pool for the
            # next batches: a whole pass's reference kept pinned would lock
            # gigabytes of host memory on a large corpus.
            batch = {k: torch.empty(v.shape, dtype=v.dtype).copy_(v) for k, v in batch.items()}
        if reference is not None:
            batch["kld"], batch["tail_mass"] = kl_against_topk(
                reference.topk_logprobs[self.rows], reference.topk_ids[self.rows], batch.pop("lq")
            )
            batch["same_top"] = batch["same_top"].float()
        for name, values in batch.items():
            for i, piece in zip(self.indices, values.split(self.sizes)):
                per_window[i][name] = piece
        if on_batch:
            on_batch(self.done, total)


def agrees_with_top1(lp: torch.Tensor, lq: torch.Tensor, ref_ids: torch.Tensor) -> torch.Tensor:
    """Per token, whether argmax(lp) is the reference's top-1 token
    (``ref_ids[:, 0]``), given ``lq``, lp gathered at ``ref_ids``.

    Exactly ``lp.argmax(-1) == ref_ids[:, 0]``, but on CPU a full argmax over
    the vocabulary costs as much as the log-softmax (7 ms per 511 x 49,152
    row), and the gathered values settle most tokens: another gathered token
    above the top-1 means no; the top-1 above every other gathered token and
    above all the probability left outside them (no outside token can then
    reach it) means yes. Only the rest (ties, or much mass outside the
    reference's top-k) take the full argmax."""
    if lp.device.type != "cpu":
        return lp.argmax(-1) == ref_ids[:, 0]
    top1 = lq[:, 0]
    others = lq[:, 1:].amax(-1) if lq.shape[1] > 1 else torch.full_like(top1, -math.inf)
    # float64 sums: the outside mass is 1 - sum(q), which float32 rounds badly;
    # the margin covers the float32 rounding of the log-probabilities.
    outside = (1.0 - lq.double().exp().sum(-1)).clamp_min(0.0)
    surely = (top1 > others) & (outside + 1e-6 < top1.double().exp())
    undecided = ~surely & ~(others > top1)
    rows = undecided.nonzero()[:, 0].tolist()
    if len(rows) > lp.shape[0] // 2:  # mostly flat distributions: one pass over all
        return lp.argmax(-1) == ref_ids[:, 0]
    for row in rows:  # row by row: indexing several rows at once would copy them
        surely[row] = lp[row].argmax() == ref_ids[row, 0]
    return surely


class _RowBuffers:
    """Float32 log-softmax into one reused buffer. A fresh [tokens x vocab]
    result per row (100 MB for 511 x 49,152) costs more in page faults than
    in arithmetic on CPU: 52 vs 15 ms per row measured, same values."""

    def __init__(self):
        self.out: Optional[torch.Tensor] = None
        self.cast: Optional[torch.Tensor] = None

    def _rows(self, name: str, like: torch.Tensor) -> torch.Tensor:
        held = getattr(self, name)
        if (
            held is None
            or held.shape[0] < like.shape[0]
            or held.shape[1:] != like.shape[1:]
            or held.device != like.device
        ):
            held = torch.empty((like.shape[0], *like.shape[1:]), dtype=torch.float32, device=like.device)
            setattr(self, name, held)
        return held[: like.shape[0]]

    def log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.is_cuda and logits.dtype == torch.float16:
            # CUDA's kernel reads float16 and computes and writes float32 in
            # one pass (half_to_float): no float32 copy of the logits first.
            # It has no such mode for bfloat16, nor has the CPU kernel.
            return torch.ops.aten._log_softmax.out(logits, -1, True, out=self._rows("out", logits))
        if logits.dtype != torch.float32:
            logits = self._rows("cast", logits).copy_(logits)
        out = self._rows("out", logits)
        # aten's out= variant of log_softmax (torch.log_softmax has none).
        return torch.ops.aten._log_softmax.out(logits, -1, False, out=out)


def reference_from(scores: TokenScores) -> Reference:
    return Reference(scores.tensor("topk_logprobs"), scores.tensor("topk_ids"), scores.tensor("token_logprobs"))
