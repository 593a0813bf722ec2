"""Every metric qbench records, described once: its unit, which direction is
better, how a table shows it, how its samples aggregate, and what kind of
figure it is. The table, the report, ``compare``, ``search`` and ``export``
read it; a metric a plugin or a task adds that is not here is shown with
defaults and judged by nothing.

The budget rule lives here too, so the report's recommendation and
``qbench search`` decide "within budget" one way: a bound holds at the error
bar, the worse end of the 95% interval (value + 1.96 standard errors where
lower is better, value - 1.96 where higher is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

#: A bound holds "at the error bar" when it holds at the end of the 95% interval.
Z = 1.96
MIB = 2**20

Kind = Literal["quality", "latency", "memory", "throughput", "other"]


@dataclass(frozen=True)
class MetricInfo:
    name: str
    #: the table's header
    label: str
    unit: str
    #: True: higher is better; False: lower is; None: neither (a description)
    higher_is_better: Optional[bool]
    kind: Kind
    #: how the value summarises its samples
    aggregation: str
    fmt: str = ".4f"
    scale: float = 1.0
    #: the table shows ± its standard error
    show_stderr: bool = True
    #: ``qbench compare`` judges a change in it between two runs
    compared: bool = False


def _m(
    name, label, unit, higher, kind, aggregation, fmt=".4f", scale=1.0, show_stderr=True, compared=False
) -> MetricInfo:
    return MetricInfo(name, label, unit, higher, kind, aggregation, fmt, scale, show_stderr, compared)


# fmt: off
METRICS: dict[str, MetricInfo] = {m.name: m for m in (
    _m("weight_bytes", "weights MiB", "bytes", False, "memory", "sum over tensors, shared storage once", ".1f",
       1 / MIB, False, compared=True),
    _m("peak_rss_bytes", "peak RSS MiB", "bytes", False, "memory", "max over the worker's life", ".0f", 1 / MIB,
       False),
    _m("kv_bytes_per_token", "KV B/tok", "bytes", False, "memory", "computed from the cache's storage type", ".0f",
       show_stderr=False),
    _m("kv_bytes_per_token_measured", "KV B/tok held", "bytes", False, "memory",
       "bytes the scoring pass's cache held / positions", ".0f", show_stderr=False),
    _m("kv_bytes", "KV MiB", "bytes", False, "memory", "KV bytes per token x context length, one sequence", ".1f",
       1 / MIB, False),
    _m("total_bytes", "weights+KV MiB", "bytes", False, "memory", "weight bytes + KV bytes at the context length",
       ".1f", 1 / MIB, False),
    _m("perplexity", "PPL", "ppl", False, "quality", "exp of the mean NLL over scored tokens", ".3f", compared=True),
    _m("word_perplexity", "word PPL", "ppl", False, "quality", "exp of the NLL sum per word", ".3f",
       show_stderr=False),
    _m("byte_perplexity", "byte PPL", "ppl", False, "quality", "exp of the NLL sum per UTF-8 byte", ".5f",
       show_stderr=False),
    _m("bits_per_byte", "bits/byte", "bits", False, "quality", "NLL sum / bytes / ln 2", ".5f", show_stderr=False),
    _m("nll", "NLL nats/tok", "nats", False, "quality", "mean over scored tokens"),
    _m("ln_ppl_ratio", "ln(PPL/base)", "nats", False, "quality", "mean over scored tokens, paired with the baseline",
       compared=True),
    _m("kld", "KLD", "nats", False, "quality", "mean over scored tokens", ".5f", compared=True),
    _m("same_top_p", "same top %", "fraction", True, "quality", "mean over scored tokens", ".2f", 100.0,
       compared=True),
    _m("acc", "acc %", "fraction", True, "quality", "mean over items", ".1f", 100.0, compared=True),
    _m("acc_norm", "acc_norm %", "fraction", True, "quality", "mean over items", ".1f", 100.0, compared=True),
    _m("gen_exact_match", "gen exact %", "fraction", True, "quality", "mean over prompts", ".0f", 100.0,
       show_stderr=False),
    _m("prefill_ms", "prefill ms", "ms", False, "latency", "median per trial, geometric mean over trials", ".1f",
       compared=True),
    _m("decode_ms_per_token", "decode ms/tok", "ms/token", False, "latency",
       "median of per-token gaps per trial, geometric mean over trials", ".2f", compared=True),
    _m("decode_tokens_per_s", "tok/s", "tokens/s", True, "throughput", "batch x 1000 / median decode gap (ms)",
       ".1f", show_stderr=False),
    _m("roofline_fraction", "BW % of peak", "fraction", None, "other",
       "weight bytes per decode step / step time / copy peak", ".1f", 100.0, False),
)}
# fmt: on


def info(name: str) -> MetricInfo:
    """The metric's description; one qbench does not know gets defaults."""
    return METRICS.get(name) or MetricInfo(name, name, "", None, "other", "as its engine reports it", ".4g")


def compared(kind: Kind) -> tuple[str, ...]:
    """The metrics of ``kind`` that ``qbench compare`` judges."""
    return tuple(name for name, m in METRICS.items() if m.kind == kind and m.compared)


def at_error_bar(value: float, stderr: Optional[float], higher_is_better: bool) -> float:
    """The end of the 95% interval that a bound is judged at: the worse end."""
    return value - Z * (stderr or 0.0) if higher_is_better else value + Z * (stderr or 0.0)


def judge(name: str, value: float, stderr: Optional[float], bound: float) -> bool:
    """Whether metric ``name`` at ``value`` meets ``bound`` at its error bar:
    the one rule of "within budget" (see the module)."""
    higher = info(name).higher_is_better
    if higher is None:
        raise ValueError(f"metric '{name}' has no better direction: no budget can be set on it")
    end = at_error_bar(value, stderr, higher)
    return end >= bound if higher else end <= bound
