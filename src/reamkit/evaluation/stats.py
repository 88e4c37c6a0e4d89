"""Uncertainty of the measured figures: standard errors over evaluation chunks, quantile errors, binomial
intervals, and the rule that decides whether two figures differ at all.

KLD and same-top-1 are averages over tokens, but tokens of one text window are not independent (a hard passage
is hard for many tokens in a row), so llama-perplexity's own ``±`` (token-level) understates the error. The
error used here is the one over chunks: ``llama-perplexity`` prints a running mean after every chunk, from
which each chunk's own value is recovered (chunks score equally many tokens). Paired differences between two
variants use the same chunks of the same text, which cancels the text's own difficulty.
"""

from __future__ import annotations

import math
import re
import statistics

Z = 2.0                 # "differs" means |difference| > Z standard errors (about 95%)
Z95 = 1.959964
MIN_CHUNKS = 2          # a standard error over chunks needs at least two
PAIRED_MIN_CHUNKS = 5   # below this a paired error is itself too noisy; the unpaired one is used

_ROW = re.compile(r"^\s*(\d+)\s+(\S+)\s+±\s+\S+\s+(\S+)\s+±\s+\S+\s+(\S+)\s+±\s+\S+\s+(\S+)\s+±\s+\S+\s*%"
                  r"\s+(\S+)\s+±\s+\S+\s*%\s*$")
KLD_DECIMALS = 5        # the per-chunk table's precision (%10.5lf; same top p: %6.3lf in percent)
TOP1_DECIMALS = 3


def chunk_table(text: str) -> dict[str, list[float]]:
    """Running means per chunk from the ``--kl-divergence`` table: ``{"kld": [...], "top1_pct": [...]}``."""
    kld, top = [], []
    for line in text.splitlines():
        m = _ROW.match(line)
        if not m or int(m.group(1)) != len(kld) + 1:
            continue
        try:
            kld.append(float(m.group(4)))
            top.append(float(m.group(6)))
        except ValueError:
            return {"kld": [], "top1_pct": []}
    return {"kld": kld, "top1_pct": top}


def per_chunk(running: list[float]) -> list[float]:
    """Each chunk's own value from running means over equal chunks: ``x_i = i m_i - (i-1) m_(i-1)``."""
    out, prev = [], 0.0
    for i, m in enumerate(running, 1):
        out.append(i * m - (i - 1) * prev)
        prev = m
    return out


def rounding_var(n: int, decimals: int) -> float:
    """Mean variance that the printed rounding adds to a recovered chunk value (uniform rounding error)."""
    if n < 1:
        return 0.0
    q2 = (10.0 ** -decimals) ** 2 / 12
    return sum(q2 * (i * i + (i - 1) * (i - 1)) for i in range(1, n + 1)) / n


def mean_se(values: list[float], decimals: int | None = None) -> float | None:
    """Standard error of the mean of per-chunk values (the printed rounding's share removed, never below 0)."""
    n = len(values)
    if n < MIN_CHUNKS:
        return None
    var = statistics.variance(values)
    if decimals is not None:
        var = max(var - rounding_var(n, decimals), 0.0) + (10.0 ** -decimals) ** 2 / 12
    return math.sqrt(var / n)


def paired_se(a: list[float], b: list[float]) -> float | None:
    """Standard error of mean(a - b) over paired chunks; None when they are not the same chunks."""
    if len(a) != len(b) or len(a) < PAIRED_MIN_CHUNKS:
        return None
    return math.sqrt(statistics.variance([x - y for x, y in zip(a, b)]) / len(a))


def quantile_se(p: float, tokens: int, quantiles: dict[float, float], design_effect: float = 1.0) -> float | None:
    """Standard error of an empirical quantile: the order-statistic rank band ``p ± sqrt(p(1-p)/n_eff)`` mapped
    through the printed quantiles (linear between them); ``n_eff = tokens / design_effect``."""
    if tokens < 2 or len(quantiles) < 2:
        return None
    n_eff = tokens / max(design_effect, 1.0)
    h = math.sqrt(p * (1 - p) / n_eff)
    pts = sorted(quantiles.items())

    def at(q: float) -> float:
        q = min(max(q, pts[0][0]), pts[-1][0])
        for (p0, v0), (p1, v1) in zip(pts, pts[1:]):
            if p0 <= q <= p1:
                return v0 if p1 == p0 else v0 + (v1 - v0) * (q - p0) / (p1 - p0)
        return pts[-1][1]

    return (at(p + h) - at(p - h)) / 2


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_se(k: int, n: int) -> float | None:
    """Standard error of a proportion, Agresti-Coull style (never 0 at 0/n or n/n, where the plain one is)."""
    if n <= 0:
        return None
    pt = (k + 2) / (n + 4)
    return math.sqrt(pt * (1 - pt) / (n + 4))


def differs(a: float | None, b: float | None, se: float | None) -> bool:
    """Whether ``a`` and ``b`` differ by more than :data:`Z` standard errors of their difference."""
    if a is None or b is None:
        return False
    return abs(a - b) > Z * (se or 0.0)


def combine(*ses: float | None) -> float | None:
    """Standard error of a sum of independent terms (None if any is unknown)."""
    if any(s is None for s in ses):
        return None
    return math.sqrt(sum(s * s for s in ses))


def sig(se: float | None) -> str:
    """A standard error written to two significant digits."""
    if se is None:
        return "?"
    if se == 0:
        return "0"
    return f"{se:.2g}"


_PCT = re.compile(r"^\s*(Maximum|99\.9%|99\.0%|95\.0%|90\.0%|Median)\s+KLD:\s*(\S+)", re.M)
_P = {"Maximum": 1.0, "99.9%": 0.999, "99.0%": 0.99, "95.0%": 0.95, "90.0%": 0.90, "Median": 0.5}


def kld_uncertainty(text: str, figures: dict, tokens: int) -> dict:
    """Chunk-level errors for one ``--kl-divergence`` log: ``kld_mean_se``, ``same_top1_pct_se``, ``kld_p99_se``
    and the per-chunk values (kept so that two variants can be compared on the same chunks).

    Each error is at least llama-perplexity's own token-level ``±`` (tokens within a chunk are positively
    correlated, so the chunk error is the larger one when there are enough chunks to estimate it)."""
    table = chunk_table(text)
    kld, top = per_chunk(table["kld"]), per_chunk(table["top1_pct"])
    k_se = mean_se(kld, KLD_DECIMALS)
    t_se = mean_se(top, TOP1_DECIMALS)
    k_tok, t_tok = figures.get("kld_mean_err"), figures.get("same_top1_pct_err")
    out = {"chunks": {"kld": [round(v, 7) for v in kld], "top1_pct": [round(v, 5) for v in top]},
           "kld_mean_se": _larger(k_se, k_tok), "same_top1_pct_se": _larger(t_se, t_tok),
           "se_method": "over chunks" if k_se is not None else "token-level (llama-perplexity)"}
    deff = (k_se / k_tok) ** 2 if k_se and k_tok else 1.0
    qs: dict[float, float] = {}
    for m in _PCT.finditer(text):
        try:
            v = float(m.group(2))
        except ValueError:
            continue
        if math.isfinite(v):
            qs[_P[m.group(1)]] = v
    out["kld_p99_se"] = quantile_se(0.99, tokens, qs, deff) if 0.99 in qs else None
    out["design_effect"] = round(deff, 3)
    return out


def _larger(a: float | None, b: float | None) -> float | None:
    vals = [v for v in (a, b) if v is not None]
    return max(vals) if vals else None
