"""Feature layouts: which columns of ``phi`` belong to which parameter and layer.

A layout is a list of :class:`FeatureBlock`, consecutive and covering ``0 .. k``:

- raw gradients (``proj_dim=None``) and ``projection="factored"``: one block per differentiated
  parameter, in the model's parameter order;
- ``projection="per_layer"``: one block per layer (module), ``k_l`` columns each
  (:func:`per_layer_dims`), projecting only that layer's gradient with its own matrix;
- ``projection="dense"``: a single block ``"dense"`` (every column mixes every parameter).

A block's ``layer`` is the module that owns it (the parameter name without its last
component); :func:`layer_blocks` merges a layer's consecutive blocks, the unit of the
block-diagonal kernel (``kernel="per_layer"``, :mod:`trak_fast.kernel`).
"""
from __future__ import annotations

import math
from typing import Dict, List, NamedTuple, Sequence


class FeatureBlock(NamedTuple):
    """Columns ``start:stop`` of the features belong to ``name`` (a parameter or a layer), which
    belongs to module ``layer``."""

    name: str
    start: int
    stop: int
    layer: str


def layer_of(parameter: str) -> str:
    """The module path of a parameter name (``"h.0.mlp.c_fc.weight"`` -> ``"h.0.mlp.c_fc"``)."""
    return parameter.rsplit(".", 1)[0] if "." in parameter else parameter


def parameter_layout(names: Sequence[str], widths: Sequence[int]) -> List[FeatureBlock]:
    blocks, column = [], 0
    for name, width in zip(names, widths):
        blocks.append(FeatureBlock(name, column, column + width, layer_of(name)))
        column += width
    return blocks


def layer_blocks(layout: Sequence[FeatureBlock]) -> List[FeatureBlock]:
    """The layout with each layer's consecutive blocks merged (named by the layer)."""
    merged: List[FeatureBlock] = []
    for block in layout:
        if merged and merged[-1].layer == block.layer and merged[-1].stop == block.start:
            merged[-1] = merged[-1]._replace(stop=block.stop)
        else:
            merged.append(FeatureBlock(block.layer, block.start, block.stop, block.layer))
    return merged


def per_layer_dims(layer_sizes: Dict[str, int], proj_dim: int) -> Dict[str, int]:
    """Splits ``proj_dim`` over layers: ``k_l`` proportional to ``sqrt(p_l)``, at least ``k_min``.

    ``k_min = min(32, proj_dim // (2 L))`` (at least 1) for ``L`` layers: a small layer still
    gets enough columns for a usable projection, a large one gets more, but sublinearly in its
    size (a layer's JL error depends on ``k_l``, not on ``p_l``, so proportional-to-size
    starves small layers). The shares are rounded by largest remainder so that
    ``sum_l k_l = proj_dim`` exactly. Requires ``proj_dim >= L``.
    """
    names = list(layer_sizes)
    if proj_dim < len(names):
        raise ValueError(f"projection='per_layer' needs proj_dim >= the number of layers "
                         f"({len(names)}), got proj_dim={proj_dim}")
    k_min = max(1, min(32, proj_dim // (2 * len(names))))
    free = proj_dim - k_min * len(names)
    weights = [math.sqrt(layer_sizes[n]) for n in names]
    total = sum(weights)
    shares = [free * w / total for w in weights]
    dims = [k_min + int(math.floor(s)) for s in shares]
    left = proj_dim - sum(dims)
    for i in sorted(range(len(names)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))[:left]:
        dims[i] += 1
    return dict(zip(names, dims))


def layout_to_json(layout: Sequence[FeatureBlock]) -> List[list]:
    return [[b.name, b.start, b.stop, b.layer] for b in layout]
