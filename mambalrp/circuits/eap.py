"""Edge attribution patching (EAP) on the layer graph of a Mamba model, and circuit search.

Graph: nodes are the embedding (``"embed"``), each layer (``"L0" .. "L{n-1}"``) and the output
(``"output"``). A layer's *input* is what its mixer reads (the input of the block's norm,
``hook_layer_input``; the residual stream itself carries on unchanged) and its *output* is its
mixer output (``hook_out_proj``); the output node's input is the final residual stream
(``hook_resid_final``). The residual stream is the sum of the outputs of all earlier nodes, so
every earlier node feeds every later one: edge ``i -> j`` for ``i`` before ``j``.

Patching edge ``i -> j`` replaces node ``j``'s input by ``input_j - out_i + corrupt_out_i``. Its
attribution (first-order estimate of the metric change) is::

    score(i -> j, t) = sum_{n, d} (corrupt_out_i - clean_out_i)[n, t, d] * c_j[n, t, d]

with ``c_j`` the gradient of the metric at node ``j``'s input (``"eap"``), its average along the
clean-to-corrupted input path (``"eap-ig"``), or the MambaLRP relevance flow (``"relp"``, see
:mod:`mambalrp.circuits.relp`). Positional EAP keeps ``t``; plain EAP sums it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mambalrp.circuits.attribution import Method, coefficients
from mambalrp.circuits.hooks import HookedMamba, HookPoint
from mambalrp.rules import RuleSet

Metric = Callable[[torch.Tensor], torch.Tensor]
Edge = tuple[str, str]


def graph_nodes(n_layers: int) -> list[str]:
    """``["embed", "L0", ..., "L{n-1}", "output"]``."""
    return ["embed", *[f"L{l}" for l in range(n_layers)], "output"]


def graph_edges(n_layers: int) -> list[Edge]:
    """Every edge ``(src, dst)`` with ``src`` before ``dst``, grouped by destination."""
    nodes = graph_nodes(n_layers)
    return [(nodes[i], nodes[j]) for j in range(1, len(nodes)) for i in range(j)]


def _out_name(node: str) -> str:
    return "hook_embed" if node == "embed" else f"blocks.{node[1:]}.hook_out_proj"


def _in_name(node: str) -> str:
    return "hook_resid_final" if node == "output" else f"blocks.{node[1:]}.hook_layer_input"


@dataclass
class EdgeAttribution:
    """Per-edge, per-position attribution scores.

    Attributes:
        nodes: Node names.
        edges: ``(src, dst)`` pairs.
        scores: ``(n_edges, T)`` positional scores (``scores.sum(1)`` is plain EAP).
        method: ``"eap"``, ``"eap-ig"`` or ``"relp"``.
    """

    nodes: list[str]
    edges: list[Edge]
    scores: torch.Tensor
    method: str = "eap"

    @property
    def edge_scores(self) -> torch.Tensor:
        """``(n_edges,)`` plain (position-summed) scores."""
        return self.scores.sum(1)

    def ranked(self, positional: bool = False) -> list[tuple[tuple, float]]:
        """Edges (``(src, dst)`` or ``(src, dst, position)``) sorted by decreasing ``|score|``."""
        if positional:
            items = [((s, d, t), float(self.scores[e, t])) for e, (s, d) in enumerate(self.edges)
                     for t in range(self.scores.shape[1])]
        else:
            items = [(edge, float(v)) for edge, v in zip(self.edges, self.edge_scores)]
        return sorted(items, key=lambda kv: -abs(kv[1]))

    def mask(self, keys: Sequence[tuple], positional: bool = False) -> torch.Tensor:
        """``(n_edges, T)`` boolean mask of the given edges (whole edges unless ``positional``)."""
        index = {e: i for i, e in enumerate(self.edges)}
        m = torch.zeros(self.scores.shape, dtype=torch.bool)
        for key in keys:
            if positional:
                m[index[(key[0], key[1])], key[2]] = True
            else:
                m[index[(key[0], key[1])]] = True
        return m

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (nodes; edges with plain and per-position scores)."""
        return {
            "method": self.method,
            "nodes": list(self.nodes),
            "edges": [
                {"src": s, "dst": d, "score": float(self.edge_scores[e]), "positional": self.scores[e].tolist()}
                for e, (s, d) in enumerate(self.edges)
            ],
        }

    def to_json(self, path: str | None = None) -> str:
        """Serialise :meth:`to_dict`; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def to_networkx(self, mask: torch.Tensor | None = None):
        """A ``networkx.DiGraph`` (edges restricted to ``mask`` when given); needs networkx."""
        try:
            import networkx as nx
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("to_networkx needs networkx: pip install networkx") from err
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for e, (s, d) in enumerate(self.edges):
            if mask is not None and not bool(mask[e].any()):
                continue
            positions = self.scores[e].tolist() if mask is None else [
                v if bool(k) else 0.0 for v, k in zip(self.scores[e].tolist(), mask[e].tolist())]
            g.add_edge(s, d, score=float(sum(positions)), positional=positions)
        return g


def edge_attribution_patching(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    metric: Metric,
    *,
    method: Method = "eap",
    ig_steps: int = 5,
    relp_rules: str | RuleSet = "mambalrp",
) -> EdgeAttribution:
    """Attribution scores of every edge of the layer graph, per position.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)``.
        metric: Scalar function of the logits (e.g. :class:`~mambalrp.circuits.ioi.IOIMetric`).
        method: ``"eap"`` (gradient), ``"eap-ig"`` (integrated gradients) or ``"relp"``.
        ig_steps: Interpolation points of ``"eap-ig"``.
        relp_rules: Rule set of ``"relp"``.

    Returns:
        An :class:`EdgeAttribution` with ``(n_edges, T)`` scores.
    """
    nodes = graph_nodes(hooked.n_layers)
    edges = graph_edges(hooked.n_layers)
    out_names = [_out_name(n) for n in nodes[:-1]]
    in_names = [_in_name(n) for n in nodes[1:]]
    acts, coef = coefficients(hooked, clean, corrupt, metric, out_names + in_names, method,
                              ig_steps=ig_steps, relp_rules=relp_rules)
    with torch.no_grad():  # same forward path as the clean activations
        rules = relp_rules if method == "relp" else None
        _, corrupt_cache = hooked.run_with_cache(corrupt, names_filter=out_names, rules=rules)
    deltas = {n: (corrupt_cache[n] - acts[n]).float() for n in out_names}
    scores = torch.stack([
        (deltas[_out_name(s)] * coef[_in_name(d)].float()).sum(-1).sum(0) for s, d in edges
    ])
    return EdgeAttribution(nodes, edges, scores.detach(), method)


@torch.no_grad()
def run_circuit(
    hooked: HookedMamba,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    keep: torch.Tensor,
    *,
    corrupt_cache: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the clean prompts with every edge outside the circuit patched to its corrupted value.

    Node ``j``'s input becomes ``input_j - sum_{i: (i->j, t) not kept} (out_i - corrupt_out_i)``
    at each position ``t``, where ``out_i`` is node ``i``'s output in this same run.

    Args:
        hooked: The hooked model.
        clean: Clean tokens ``(N, T)``.
        corrupt: Corrupted tokens ``(N, T)``.
        keep: ``(n_edges, T)`` (or ``(n_edges,)``) boolean mask of the circuit, edges in
            :func:`graph_edges` order.
        corrupt_cache: Corrupted node outputs, to reuse between calls.

    Returns:
        The logits of the patched run.
    """
    n_layers = hooked.n_layers
    nodes, edges = graph_nodes(n_layers), graph_edges(n_layers)
    T = clean.shape[1]
    keep = keep.reshape(len(edges), -1).expand(len(edges), T).float()
    out_names = [_out_name(n) for n in nodes[:-1]]
    if corrupt_cache is None:
        _, corrupt_cache = hooked.run_with_cache(corrupt, names_filter=out_names)
    incoming: dict[str, list[tuple[int, str]]] = {}
    for e, (s, d) in enumerate(edges):
        if not bool(keep[e].all()):
            incoming.setdefault(_in_name(d), []).append((e, _out_name(s)))
    live: dict[str, torch.Tensor] = {}

    def store(act: torch.Tensor, hp: HookPoint) -> None:
        live[hp.name] = act

    def patch(act: torch.Tensor, hp: HookPoint) -> torch.Tensor:
        for e, src in incoming[hp.name]:
            drop = (1.0 - keep[e])[None, :, None].to(act.dtype)
            act = act - drop * (live[src] - corrupt_cache[src].to(act.dtype))
        return act

    hooks = [(n, store) for n in out_names] + [(n, patch) for n in incoming]
    return hooked.run_with_hooks(clean, fwd_hooks=hooks)


@dataclass
class CircuitSearch:
    """Result of :func:`find_circuit`.

    Attributes:
        size: Number of kept edges (or edge-positions) in the smallest passing circuit found.
        keys: The kept edges, most important first.
        mask: ``(n_edges, T)`` boolean mask of the circuit.
        score: The score function on the circuit.
        full_score: The score with nothing patched (the whole model).
        evaluations: ``(size, score)`` of every circuit evaluated by the search.
    """

    size: int
    keys: list[tuple]
    mask: torch.Tensor
    score: float
    full_score: float
    evaluations: list[tuple[int, float]] = field(default_factory=list)


@torch.no_grad()
def find_circuit(
    hooked: HookedMamba,
    attribution: EdgeAttribution,
    clean: torch.Tensor,
    corrupt: torch.Tensor,
    score_fn: Metric,
    threshold: float,
    *,
    positional: bool = False,
) -> CircuitSearch:
    """Binary search over ``k`` for the smallest top-``k`` circuit whose score reaches ``threshold``.

    Candidates are the top-``k`` edges by ``|score|`` (per position when ``positional``). Each
    candidate is evaluated by actually running it (:func:`run_circuit`). The search assumes the
    score grows with ``k``; every evaluation is recorded.

    Args:
        hooked: The hooked model.
        attribution: From :func:`edge_attribution_patching`.
        clean: Clean tokens.
        corrupt: Corrupted tokens.
        score_fn: Function of the patched logits, e.g. IOI accuracy.
        threshold: Minimum score the circuit must keep (e.g. 0.85).
        positional: Rank and keep (edge, position) items instead of whole edges.

    Returns:
        A :class:`CircuitSearch`.
    """
    ranked = [k for k, _ in attribution.ranked(positional)]
    out_names = [_out_name(n) for n in attribution.nodes[:-1]]
    _, corrupt_cache = hooked.run_with_cache(corrupt, names_filter=out_names)
    evaluations: list[tuple[int, float]] = []
    memo: dict[int, float] = {}

    def evaluate(k: int) -> float:
        if k not in memo:
            mask = attribution.mask(ranked[:k], positional)
            memo[k] = float(score_fn(run_circuit(hooked, clean, corrupt, mask, corrupt_cache=corrupt_cache)))
            evaluations.append((k, memo[k]))
        return memo[k]

    full = float(score_fn(hooked.run_with_hooks(clean)))
    lo, hi = 0, len(ranked)
    if evaluate(hi) < threshold:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if evaluate(mid) >= threshold:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    return CircuitSearch(size=k, keys=ranked[:k], mask=attribution.mask(ranked[:k], positional),
                         score=evaluate(k), full_score=full, evaluations=evaluations)
