"""How a pipeline splits layers over ranks (pure Python: the planner prices the same split)."""

from __future__ import annotations

from ..model.config import ModelArgs
from ..errors import GlmMlxError


class DistributedError(GlmMlxError):
    hint = "Another machine of the pipeline stopped or is unreachable; check its log, then restart all ranks."


def split_layers(args: ModelArgs, n_ranks: int, layer_weights: list[float] | None = None,
                 shares: list[float] | None = None) -> list[tuple[int, int]]:
    """Contiguous [start, end) layer ranges: rank r gets about shares[r] of the total layer weight
    (default: equal weights, equal shares). The planner calls this with bytes and Mac capacities.

    A rank never starts on a shared-indexer layer: it would need the previous rank's top-k.
    """
    n = args.num_hidden_layers
    w = layer_weights or [1.0] * n
    shares = shares or [1.0] * n_ranks
    cuts = [i for i in range(1, n) if args.indexer_types[i] == "full"]  # allowed boundaries
    if n_ranks > len(cuts) + 1:
        raise DistributedError(f"{n_ranks} ranks but only {len(cuts) + 1} layer groups can be split",
                               "Use fewer machines.")
    prefix = [0.0]
    for x in w:
        prefix.append(prefix[-1] + x)
    bounds = [0]
    for r in range(1, n_ranks):
        target = prefix[-1] * sum(shares[:r]) / sum(shares)
        # leave enough later cuts for the remaining ranks
        options = [c for c in cuts if c > bounds[-1] and sum(d > c for d in cuts) >= n_ranks - 1 - r]
        bounds.append(min(options, key=lambda c: abs(prefix[c] - target)))
    bounds.append(n)
    return [(bounds[i], bounds[i + 1]) for i in range(n_ranks)]
