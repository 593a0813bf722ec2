"""Summaries of per-token scores: perplexity, fidelity to the baseline."""

from __future__ import annotations

import math
from typing import Any

import torch

from qbench.metrics import metric, proportion_stderr

LN2 = math.log(2.0)
KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0)


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    n = x.numel()
    mean = x.mean().item()
    se = (x.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")
    return mean, se


def perplexity_metrics(token_logprobs: torch.Tensor, n_bytes: int, n_words: int) -> dict[str, Any]:
    """Token perplexity exp(mean NLL) (GPTQ protocol) with a delta-method
    standard error; word perplexity exp(sum NLL / words), byte perplexity
    exp(sum NLL / bytes) and bits per byte sum NLL / (bytes * ln 2), as
    lm-evaluation-harness defines them, over the text of exactly the scored
    tokens."""
    nll = -token_logprobs.double()
    n = nll.numel()
    mean, se = _mean_se(nll)
    total = nll.sum().item()
    ppl = math.exp(mean)
    return {
        "perplexity": metric(ppl, "ppl", n, ppl * se),
        "nll": metric(mean, "nats/token", n, se),
        "word_perplexity": metric(math.exp(total / n_words) if n_words else None, "ppl", n_words),
        "byte_perplexity": metric(math.exp(total / n_bytes) if n_bytes else None, "ppl", n_bytes),
        "bits_per_byte": metric(total / (n_bytes * LN2) if n_bytes else None, "bits/byte", n_bytes),
    }


def fidelity_metrics(
    token_logprobs: torch.Tensor,
    base_logprobs: torch.Tensor,
    kld: torch.Tensor,
    same_top: torch.Tensor,
    tail_mass: torch.Tensor,
    top_k: int,
) -> dict[str, Any]:
    """llama.cpp's `perplexity --kl-divergence` statistics on the same tokens."""
    n = kld.numel()
    kld_mean, kld_se = _mean_se(kld)
    pct = torch.quantile(kld.double(), torch.tensor([p / 100 for p in KLD_PERCENTILES], dtype=torch.double))
    top = same_top.double().mean().item()
    dp = token_logprobs.double().exp() - base_logprobs.double().exp()
    dp_mean, dp_se = _mean_se(dp)
    rms = math.sqrt((dp**2).mean().item())
    # RMS standard error by the delta method on the mean of squares.
    rms_se = ((dp**2).std().item() / math.sqrt(n)) / (2 * rms) if rms > 0 and n > 1 else None
    # ln(PPL_q / PPL_base) = mean(nll_q - nll_base); the paired difference
    # carries the covariance of the two, so its SE is far below either's.
    diff = base_logprobs.double() - token_logprobs.double()
    lr_mean, lr_se = _mean_se(diff)
    return {
        "kld": metric(
            kld_mean,
            "nats",
            n,
            kld_se,
            percentiles={f"p{p:g}": v for p, v in zip(KLD_PERCENTILES, pct.tolist())},
            approximation=f"top-{top_k} of the baseline plus one bucket for the rest (a lower bound)",
            baseline_tail_mass_mean=tail_mass.double().mean().item(),
        ),
        "same_top_p": metric(top, "fraction", n, proportion_stderr(top, n)),
        "delta_p": metric(dp_mean, "probability", n, dp_se),
        "delta_p_rms": metric(rms, "probability", n, rms_se),
        "ln_ppl_ratio": metric(lr_mean, "nats", n, lr_se),
    }
