"""Genotypes: the discrete cells a search derives, and the published ones.

A genotype lists, for each of the 4 intermediate nodes of a cell, two ``(op, input)``
pairs; inputs 0 and 1 are the two cell inputs, input ``i >= 2`` is intermediate node
``i``.  ``normal_concat`` / ``reduce_concat`` name the nodes whose outputs are
concatenated (always ``2..5`` here).
"""
from __future__ import annotations

import json
import os
from collections import namedtuple
from typing import Dict, List, Tuple

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

from ..nn.operations import PRIMITIVES  # noqa: F401  (re-exported)

_CONCAT = [2, 3, 4, 5]

DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=list(_CONCAT),
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=list(_CONCAT),
)

PC_DARTS = Genotype(
    normal=[("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
            ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=list(_CONCAT),
    reduce=[("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
            ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
    reduce_concat=list(_CONCAT),
)

ADARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("dil_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("dil_conv_3x3", 1)],
    normal_concat=list(_CONCAT),
    reduce=[("max_pool_3x3", 0), ("dil_conv_5x5", 1), ("dil_conv_3x3", 2), ("max_pool_3x3", 0),
            ("skip_connect", 2), ("skip_connect", 3), ("dil_conv_3x3", 2), ("avg_pool_3x3", 0)],
    reduce_concat=list(_CONCAT),
)

ADARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
            ("skip_connect", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 3), ("skip_connect", 4)],
    normal_concat=list(_CONCAT),
    reduce=[("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 2),
            ("max_pool_3x3", 0), ("sep_conv_5x5", 3), ("max_pool_3x3", 1), ("max_pool_3x3", 0)],
    reduce_concat=list(_CONCAT),
)

#: PC-DARTS's cell searched directly on ImageNet (its published ImageNet network, 14 cells
#: of C=48, about 5.3M weights); DARTS retrained its CIFAR cell ``DARTS_V2`` on ImageNet.
PC_DARTS_image = Genotype(
    normal=[("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
            ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
    normal_concat=list(_CONCAT),
    reduce=[("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
            ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
    reduce_concat=list(_CONCAT),
)

#: Published cells by name (docs/method.md section 6; ``PC_DARTS_image``: PC-DARTS's ImageNet cell).
PUBLISHED: Dict[str, Genotype] = {
    "DARTS_V2": DARTS_V2,
    "PC_DARTS": PC_DARTS,
    "PC_DARTS_image": PC_DARTS_image,
    "ADARTS_V1": ADARTS_V1,
    "ADARTS_V2": ADARTS_V2,
}


def validate(genotype: Genotype) -> Genotype:
    """Check that ``genotype`` is well formed; raise ``ValueError`` naming the fault."""
    if not isinstance(genotype, tuple) or len(genotype) != 4:
        raise ValueError(f"a genotype has 4 fields (normal, normal_concat, reduce, reduce_concat), got {genotype!r}")
    for field in ("normal", "reduce"):
        pairs = getattr(genotype, field)
        if len(pairs) % 2 != 0 or len(pairs) == 0:
            raise ValueError(f"genotype.{field} must hold two (op, input) pairs per node, got {len(pairs)} pairs")
        for n, (op, inp) in enumerate(pairs):
            node = n // 2 + 2
            if op not in PRIMITIVES or op == "none":
                raise ValueError(
                    f"genotype.{field}[{n}]: unknown operation {op!r}; expected one of {list(PRIMITIVES[1:])}")
            if not isinstance(inp, int) or not 0 <= inp < node:
                raise ValueError(f"genotype.{field}[{n}]: node {node} cannot take input {inp!r} (valid: 0..{node - 1})")
    for field, cell in (("normal_concat", "normal"), ("reduce_concat", "reduce")):
        nodes = len(getattr(genotype, cell)) // 2 + 2
        for c in getattr(genotype, field):
            if not isinstance(c, int) or not 0 <= c < nodes:
                raise ValueError(f"genotype.{field}: node {c!r} does not exist (cell has nodes 0..{nodes - 1})")
    return genotype


def to_dict(genotype: Genotype) -> dict:
    """A JSON-friendly form of ``genotype``."""
    return {
        "normal": [[op, int(i)] for op, i in genotype.normal],
        "normal_concat": [int(i) for i in genotype.normal_concat],
        "reduce": [[op, int(i)] for op, i in genotype.reduce],
        "reduce_concat": [int(i) for i in genotype.reduce_concat],
    }


def from_dict(d: dict) -> Genotype:
    """Inverse of :func:`to_dict`; validates the result."""
    try:
        g = Genotype(
            normal=[(str(op), int(i)) for op, i in d["normal"]],
            normal_concat=[int(i) for i in d["normal_concat"]],
            reduce=[(str(op), int(i)) for op, i in d["reduce"]],
            reduce_concat=[int(i) for i in d["reduce_concat"]],
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a genotype: {e!s}; expected keys normal, normal_concat, reduce, reduce_concat") from None
    return validate(g)


def save(genotype: Genotype, path: str) -> None:
    """Write ``genotype`` as JSON to ``path`` (atomically: a temporary file, then rename)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(to_dict(genotype), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(name_or_path: str) -> Genotype:
    """A published genotype by name (``"PC_DARTS"``...) or one saved as JSON at a path."""
    if name_or_path in PUBLISHED:
        return PUBLISHED[name_or_path]
    if os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                return from_dict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(f"{name_or_path}: not a genotype JSON file ({e})") from None
    raise ValueError(
        f"unknown genotype {name_or_path!r}: give one of {sorted(PUBLISHED)} or the path of a genotype.json")


def count_skips(cell: List[Tuple[str, int]]) -> int:
    """Number of ``skip_connect`` operations in one cell's list of pairs."""
    return sum(1 for op, _ in cell if op == "skip_connect")


def derive(edge_weights, steps: int = 4) -> List[Tuple[str, int]]:
    """Derive one cell from its edge weights (docs/method.md section 3).

    ``edge_weights: (num_edges, 8)``: softmax(alpha) times the normalised beta (or plain
    softmax(alpha) without beta). For each node keep the 2 incoming edges with the largest
    best non-``none`` weight (ties: the lower input index), and on each the best non-``none``
    op (ties: the earlier op in ``PRIMITIVES``). Returns ``2 * steps`` ``(op, input)`` pairs.
    """
    import torch

    w = torch.as_tensor(edge_weights).detach().to("cpu", torch.float64)
    expected = sum(2 + i for i in range(steps))
    if w.shape != (expected, len(PRIMITIVES)):
        raise ValueError(f"derive: edge_weights must have shape ({expected}, {len(PRIMITIVES)}), got {tuple(w.shape)}")
    none = PRIMITIVES.index("none")
    rows = w.tolist()
    gene, start = [], 0
    for i in range(steps):
        n = 2 + i
        node = rows[start:start + n]
        best = [max(v for k, v in enumerate(r) if k != none) for r in node]
        # sorted() is stable: on equal strength the lower input index stays first.
        edges = sorted(range(n), key=lambda j: -best[j])[:2]
        for j in edges:
            k_best = None
            for k, v in enumerate(node[j]):
                if k != none and (k_best is None or v > node[j][k_best]):
                    k_best = k
            gene.append((PRIMITIVES[k_best], j))
        start += n
    return gene
