"""Draw a genotype's normal and reduction cells as DAGs, with matplotlib alone.

The figure is built on a :class:`matplotlib.figure.Figure` with its own Agg canvas, so
the global matplotlib backend (and pyplot's state) is never touched.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch
from matplotlib.transforms import Bbox

from ..utils.io import atomic_write

__all__ = ["plot_genotype"]

Point = Tuple[float, float]

# ----------------------------------------------------------------------------- style
_INPUT_COLOR = "#9ecae1"      # c_{k-2}, c_{k-1}
_NODE_COLOR = "#fdd49e"       # intermediate nodes
_OUTPUT_COLOR = "#a1d99b"     # c_{k}
_CONCAT_COLOR = "#a0a0a0"     # node -> c_{k}
_OP_COLORS: Dict[str, str] = {
    "none": "#b0b0b0",
    "max_pool_3x3": "#1f5fa8",
    "avg_pool_3x3": "#12929e",
    "skip_connect": "#7b3fa0",
    "sep_conv_3x3": "#c62828",
    "sep_conv_5x5": "#e0690b",
    "dil_conv_3x3": "#2b8a2b",
    "dil_conv_5x5": "#8c564b",
}
_OTHER_OP_COLOR = "#333333"

# ----------------------------------------------------------------------------- geometry
_DX = 1.75          # horizontal spacing between columns
_ZIG = 0.95         # intermediate nodes alternate between y = +_ZIG and y = -_ZIG
_IN_Y = 1.75        # c_{k-2} at y = +_IN_Y, c_{k-1} at y = -_IN_Y
_R_IO = 0.42        # radius of the input/output nodes
_R_NODE = 0.32      # radius of the intermediate nodes
_CLEARANCE = 0.14   # how far an edge must stay from nodes it does not touch
_RADS = (0.0, 0.18, -0.18, 0.32, -0.32, 0.48, -0.48, 0.65, -0.65)
_SAMPLES = 41
_CROWD = 0.3        # edges closer than this (away from their ends) count as crowded
_INCH_PER_UNIT = 0.82


def _bezier(p0: Point, p1: Point, rad: float, n: int = _SAMPLES) -> List[Point]:
    """Points along matplotlib's ``arc3,rad=rad`` curve from p0 to p1 (equal-aspect axes)."""
    (x0, y0), (x2, y2) = p0, p1
    dx, dy = x2 - x0, y2 - y0
    cx, cy = (x0 + x2) / 2 + rad * dy, (y0 + y2) / 2 - rad * dx
    pts = []
    for k in range(n):
        t = k / (n - 1)
        a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t * t
        pts.append((a * x0 + b * cx + c * x2, a * y0 + b * cy + c * y2))
    return pts


class _Cell:
    """Pure geometry of one cell: node positions, edges and their curvature."""

    def __init__(self, pairs: Sequence[Tuple[str, int]], concat: Sequence[int], which: str):
        pairs = [(str(op), int(i)) for op, i in pairs]
        self.n_inter = (len(pairs) + 1) // 2
        n_total = self.n_inter + 2
        self.labels: List[str] = [r"$c_{k-2}$", r"$c_{k-1}$"] + [str(i) for i in range(self.n_inter)] + [r"$c_{k}$"]
        self.out = n_total  # index of the output node
        self.pos: List[Point] = [(0.0, _IN_Y), (0.0, -_IN_Y)]
        for i in range(self.n_inter):
            y = 0.0 if self.n_inter == 1 else (_ZIG if i % 2 == 0 else -_ZIG)
            self.pos.append((_DX * (i + 1), y))
        self.pos.append((_DX * (self.n_inter + 1), 0.0))
        self.radius = [_R_IO, _R_IO] + [_R_NODE] * self.n_inter + [_R_IO]
        self.kind = ["input", "input"] + ["node"] * self.n_inter + ["output"]

        # (src, dst, op or None for a concat edge)
        edges: List[Tuple[int, int, Optional[str]]] = []
        for k, (op, src) in enumerate(pairs):
            dst = k // 2 + 2
            if not 0 <= src < n_total or src == dst:
                raise ValueError(f"genotype.{which}[{k}]: node {dst} cannot take input {src} "
                                 f"(the cell has nodes 0..{n_total - 1})")
            edges.append((src, dst, op))
        for c in dict.fromkeys(int(c) for c in concat):  # unique, in order
            if not 0 <= c < n_total:
                raise ValueError(f"{which}_concat: node {c} does not exist (the cell has nodes 0..{n_total - 1})")
            edges.append((c, self.out, None))
        self.edges = edges
        self.rads = self._route()
        self.curves = [_bezier(self.pos[s], self.pos[d], r) for (s, d, _), r in zip(edges, self.rads)]

    def _route(self) -> List[float]:
        """Curvature per edge: a gently bent curve that keeps clear of the other nodes and,
        as far as it can, of the edges routed before it."""
        pos = np.asarray(self.pos, dtype=float)
        radius = np.asarray(self.radius, dtype=float)
        rads: List[float] = []
        routed: List[np.ndarray] = []
        used: Counter = Counter()
        for s, d, op in self.edges:
            bend = 0.25 if op is not None else 1.0  # concat arrows: rather straight than roomy
            best, best_cost = 0.0, None
            others = [j for j in range(len(pos)) if j not in (s, d)]
            for rad in _RADS:
                if used[(s, d, rad)] or used[(d, s, -rad)]:
                    continue  # a parallel edge already takes exactly this path
                pts = np.asarray(_bezier(self.pos[s], self.pos[d], rad))
                # nodes in the way: a hard constraint
                gaps = np.linalg.norm(pts[:, None, :] - pos[None, others, :], axis=-1).min(axis=0)
                blocked = np.clip(radius[others] + _CLEARANCE - gaps, 0, None).sum()
                # running alongside earlier edges (away from this edge's own end nodes)
                free = ((np.linalg.norm(pts - pos[s], axis=1) > radius[s] + 0.45)
                        & (np.linalg.norm(pts - pos[d], axis=1) > radius[d] + 0.45))
                crowd = 0.0
                if routed and free.any():
                    near = np.stack([np.linalg.norm(pts[free][:, None, :] - r[None], axis=-1).min(axis=1)
                                     for r in routed]).min(axis=0)
                    crowd = float(np.clip(_CROWD - near, 0, None).sum() / (_CROWD * _SAMPLES))
                cost = 100.0 * blocked + crowd + bend * abs(rad)
                if best_cost is None or cost < best_cost - 1e-9:
                    best, best_cost = rad, cost
            used[(s, d, best)] += 1
            rads.append(best)
            routed.append(np.asarray(_bezier(self.pos[s], self.pos[d], best)))
        return rads

    def extent(self) -> Tuple[float, float, float, float]:
        xs = [x for x, _ in self.pos] + [x for c in self.curves for x, _ in c]
        ys = [y for _, y in self.pos] + [y for c in self.curves for _, y in c]
        m = _R_IO + 0.25
        return min(xs) - m, max(xs) + m, min(ys) - m, max(ys) + m


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _draw_cell(ax, cell: _Cell, title: str, renderer) -> None:
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.set_axis_off()

    patches = []
    for (x, y), r, kind, label in zip(cell.pos, cell.radius, cell.kind, cell.labels):
        color = {"input": _INPUT_COLOR, "node": _NODE_COLOR, "output": _OUTPUT_COLOR}[kind]
        circ = Circle((x, y), r, facecolor=color, edgecolor="#404040", linewidth=1.2, zorder=3)
        ax.add_patch(circ)
        patches.append(circ)
        ax.text(x, y, label, ha="center", va="center", fontsize=11 if kind != "node" else 11.5,
                zorder=4)

    for (s, d, op), rad in zip(cell.edges, cell.rads):
        if op is None:
            color, lw, ls = _CONCAT_COLOR, 1.1, (0, (4, 2))
        else:
            color, lw, ls = _OP_COLORS.get(op, _OTHER_OP_COLOR), 1.5, "-"
        arrow = FancyArrowPatch(
            cell.pos[s], cell.pos[d], patchA=patches[s], patchB=patches[d],
            connectionstyle=f"arc3,rad={rad}", arrowstyle="-|>", mutation_scale=13,
            shrinkA=1, shrinkB=1, color=color, linewidth=lw, linestyle=ls, zorder=2)
        ax.add_patch(arrow)

    # fix the data -> display transform before measuring the labels
    ax.apply_aspect()
    to_disp = ax.transData.transform

    node_boxes = []
    for (x, y), r in zip(cell.pos, cell.radius):
        (x0, y0), (x1, y1) = to_disp([(x - r, y - r), (x + r, y + r)])
        node_boxes.append(Bbox.from_extents(x0, y0, x1, y1))
    curve_pts = [to_disp(c) for c in cell.curves]

    # greedy placement: each op label goes where it hits the fewest earlier labels, nodes
    # and other edges, searching along its own edge outwards from the middle
    placed: List[Bbox] = []
    ts = (0.5, 0.42, 0.58, 0.35, 0.65, 0.28, 0.72, 0.22, 0.78)
    for e, (_s, _d, op) in enumerate(cell.edges):
        if op is None:
            continue
        color = _OP_COLORS.get(op, _OTHER_OP_COLOR)
        text = ax.text(0, 0, op, ha="center", va="center", fontsize=7.5, color=color, zorder=5,
                       bbox=dict(boxstyle="round,pad=0.18", facecolor="white", edgecolor=color,
                                 linewidth=0.6, alpha=0.92))
        best = None
        for rank, t in enumerate(ts):
            k = round(t * (_SAMPLES - 1))
            x, y = cell.curves[e][k]
            text.set_position((x, y))
            box = text.get_window_extent(renderer).expanded(1.08, 1.25)
            area = box.width * box.height
            cost = sum(_overlap(box, b) for b in placed) * 4.0
            cost += sum(_overlap(box, nb) for nb in node_boxes) * 6.0
            for f, pts in enumerate(curve_pts):
                if f == e:
                    continue
                inside = sum(1 for px, py in pts if box.x0 <= px <= box.x1 and box.y0 <= py <= box.y1)
                cost += inside * area * 0.02
            cost += rank * area * 0.01  # prefer the middle of the edge
            if best is None or cost < best[0]:
                best = (cost, (x, y), box)
        text.set_position(best[1])
        placed.append(best[2])


def _cells_of(genotype: Any):
    if isinstance(genotype, dict):
        get = genotype.__getitem__
    else:
        def get(name):
            return getattr(genotype, name)
    try:
        return (get("normal"), get("normal_concat")), (get("reduce"), get("reduce_concat"))
    except (KeyError, AttributeError):
        raise ValueError("plot_genotype needs a Genotype (or a dict) with normal, normal_concat, "
                         f"reduce and reduce_concat; got {type(genotype).__name__}") from None


def plot_genotype(genotype: Any, path: str, title: Optional[str] = None) -> str:
    """Draw the normal and the reduction cell of ``genotype`` side by side into a PNG at ``path``.

    Inputs ``c_{k-2}``, ``c_{k-1}`` are on the left, the intermediate nodes (``len(pairs)//2``
    of them, labelled from 0) in the middle and the output ``c_{k}`` on the right; each edge
    is labelled with its operation, grey dashed arrows mark the nodes concatenated into
    ``c_{k}``.  The file is written atomically (temporary file, then ``os.replace``).
    Returns ``path``.
    """
    path = os.fspath(path)
    (normal, normal_concat), (reduce, reduce_concat) = _cells_of(genotype)
    cells = [(_Cell(normal, normal_concat, "normal"), "normal cell"),
             (_Cell(reduce, reduce_concat, "reduce"), "reduction cell")]

    extents = [c.extent() for c, _ in cells]
    y0 = min(e[2] for e in extents)
    y1 = max(e[3] for e in extents)
    widths = [e[1] - e[0] for e in extents]
    height = y1 - y0
    fig_w = sum(widths) * _INCH_PER_UNIT + 0.6
    fig_h = height * _INCH_PER_UNIT + (1.2 if title else 0.8)

    fig = Figure(figsize=(fig_w, fig_h), dpi=110)
    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    gs = fig.add_gridspec(1, 2, width_ratios=widths, wspace=0.04,
                          left=0.01, right=0.99, bottom=0.02, top=1 - (1.0 if title else 0.6) / fig_h)
    for k, ((cell, name), (ex0, ex1, _, _)) in enumerate(zip(cells, extents)):
        ax = fig.add_subplot(gs[0, k])
        ax.set_xlim(ex0, ex1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal", adjustable="box")
        _draw_cell(ax, cell, name, renderer)
    if title:
        fig.suptitle(title, fontsize=14)

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, "wb", lambda f: fig.savefig(f, format="png", facecolor="white"))
    return path

