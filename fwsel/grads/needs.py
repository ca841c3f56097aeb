"""What a selector asks of the gradient engine: the metric, the products, the aux metrics.

A selector declares an `EngineNeeds` once; the loop hands it to `build_engine` together with
the `engine:` config group (how to compute: path, micro-batches, sketch). `products` names the
products the selector reads, so an engine may skip the ones nobody uses (TracIn reads `b` and
which rows have a non-zero gradient, never `K` or the norms); an engine may still return more. Always
there: `losses`, `target_losses`, `finite` (and `poor_frac` in the adam metrics); with `K` also
`sq_norms` (its diagonal). A product nobody asked for may be left as zeros of its usual shape.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .metric import ADAM_Q, METRICS

PRODUCTS = ("b", "k", "y2", "sq_norms", "nonzero")  # the engine's names for them (`wanted`)


class Product(enum.Flag):
    """Products of `Scores` (see docs/method.md#products)."""

    B = enum.auto()  # b[:, 0] = <g_i, M g_T> (and one column per extra direction)
    K = enum.auto()  # the Gram K = <g_i, M g_j> (its diagonal gives the squared norms)
    Y2 = enum.auto()  # y2 = <g_T, M g_T> and dir_gram
    SQ_NORMS = enum.auto()  # |g_i|_M^2 = diag(K), wanted without the rest of K
    NONZERO = enum.auto()  # |g_i| > 0 alone (Scores.nonzero): from b where b_i != 0, cheaper than the norms

    @classmethod
    def all(cls) -> "Product":
        return cls.B | cls.K | cls.Y2 | cls.SQ_NORMS | cls.NONZERO


@dataclass(frozen=True)
class EngineNeeds:
    """One selector's request to the engine (validated on construction)."""

    metric: str = "sgd"  # sgd | adam | adam2: the M of every product
    products: Product = Product.all()
    aux_metrics: tuple = ()  # other metrics whose b, sq_norms and y2 are also returned (Scores.aux)
    adam_q: str = "pool"  # frozen second moment of the adam metrics: pool | state | taylor
    clip_q: bool = False  # scale pool q by the previous step's squared clip factor (score's q_scale)

    def __post_init__(self) -> None:
        for m in (self.metric, *self.aux_metrics):
            if m not in METRICS:
                raise ValueError(f"metric must be one of {'|'.join(METRICS)}, got {m!r}")
        if self.adam_q not in ADAM_Q:
            raise ValueError(f"adam_q must be one of {'|'.join(ADAM_Q)}, got {self.adam_q!r}")
        object.__setattr__(self, "aux_metrics", tuple(self.aux_metrics))


def wanted(products) -> frozenset:
    """`products` as a set of `PRODUCTS` names: None (all), names, or an enum flag whose members
    carry those names (any case)."""
    if products is None:
        return frozenset(PRODUCTS)
    items = [products] if isinstance(products, str) else list(products)  # a flag iterates its members
    names = frozenset(str(getattr(p, "name", p)).lower() for p in items)
    if names - set(PRODUCTS):
        raise ValueError(f"products must be among {PRODUCTS}, got {sorted(names - set(PRODUCTS))}")
    return names
