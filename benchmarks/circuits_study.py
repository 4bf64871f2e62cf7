"""IOI circuit study on a small Mamba trained here: patching, ablations, EAP and RelP.

Reproducible on CPU in a few minutes::

    python -m benchmarks.circuits_study            # trains (or loads the cached checkpoint), analyses
    python -m benchmarks.circuits_study --retrain  # ignore the cached checkpoint

Steps:
    1. A word-level tokenizer over the IOI template vocabulary; a 4-layer Mamba (d_model 48,
       d_state 8) is trained on IOI prompts of the first template with 16 names (cross-entropy on
       the answer, plus a small next-token loss).
       The checkpoint (about 0.3 MB) is cached in ``benchmarks/results/``.
    2. Accuracy per corruption kind on held-out prompts.
    3. Activation patching of ``hook_resid_pre`` per (layer, position), both directions (heatmaps).
    4. Zero / mean / resample ablation of whole layers (chart).
    5. Conv-slice patching of the layer whose ablation hurts most.
    6. Positional EAP, EAP-IG and RelP on the layer graph; the smallest circuit keeping the
       accuracy threshold for each ranking.
    7. Pearson correlation of EAP, EAP-IG and RelP node estimates with the true activation
       patching effects, per node type (residual stream, mixer output, SSM input).

Outputs: ``benchmarks/results/circuits_study.json`` and ``circuits_*.png``. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mambalrp.circuits import (
    CORRUPTIONS,
    METHODS,
    HookedMamba,
    IOIMetric,
    WordTokenizer,
    ablate_layers,
    accuracy,
    attribution_patching,
    conv_slice_patching,
    edge_attribution_patching,
    find_circuit,
    generate_pairs,
    logit_diff,
    patch_sweep,
    tokenize_pairs,
)
from mambalrp.circuits.ioi import NAMES, PLACES, SLOTS
from mambalrp.rules import GRADIENT, MAMBALRP

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = dict(hidden_size=48, state_size=8, num_hidden_layers=4, expand=2, conv_kernel=4)
TRAIN = dict(steps=600, batch=32, lr=5e-3, weight_decay=0.01, lm_weight=0.1, seed=0, n_names=16, templates=(0,))
NODE_HOOKS = ("hook_resid_pre", "hook_out_proj", "hook_ssm_input")


def _task() -> dict:
    """Names and templates the model is trained and evaluated on."""
    return {"names": NAMES[: TRAIN["n_names"]], "templates": list(TRAIN["templates"])}


def build_model(vocab_size: int):
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(TRAIN["seed"])
    cfg = MambaConfig(vocab_size=vocab_size, use_cache=False, **CONFIG)
    return MambaForCausalLM(cfg)


def _fingerprint(tok: WordTokenizer) -> str:
    blob = json.dumps({"config": CONFIG, "train": TRAIN, "vocab": tok.vocab}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train(tok: WordTokenizer, log) -> torch.nn.Module:
    """Train on clean prompts; deterministic for a given seed and thread count."""
    model = build_model(tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / TRAIN["steps"])))
    model.train()
    t0 = time.time()
    for step in range(TRAIN["steps"]):
        pairs = generate_pairs(TRAIN["batch"], seed=10_000 + step, **_task())
        # the corrupted prompts are valid IOI prompts too: train on both halves of each pair
        batches = tokenize_pairs(tok, pairs)
        loss = 0.0
        for b in batches:
            w = len(b) / TRAIN["batch"]
            ids = torch.cat([b.clean_tokens, b.corrupt_tokens])
            ans = torch.cat([b.clean_answer, b.corrupt_answer])
            logits = model(ids).logits
            answer_loss = F.cross_entropy(logits[:, -1], ans)
            lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss = loss + w * (answer_loss + TRAIN["lm_weight"] * lm_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == TRAIN["steps"] - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  held-out top-1 accuracy {_quick_accuracy(model, tok):.3f}"
                f"  ({time.time() - t0:.0f} s)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def _quick_accuracy(model, tok: WordTokenizer) -> float:
    was = model.training
    model.eval()
    ok, n = 0.0, 0
    for b in tokenize_pairs(tok, generate_pairs(100, seed=99, **_task())):
        ok += float(accuracy(model(b.clean_tokens).logits, b.clean_answer)) * len(b)
        n += len(b)
    model.train(was)
    return ok / n


def load_or_train(tok: WordTokenizer, retrain: bool, log) -> tuple[torch.nn.Module, dict]:
    path = RESULTS / "circuits_ioi_mamba.pt"
    fp = _fingerprint(tok)
    if path.exists() and not retrain:
        blob = torch.load(path, weights_only=True)
        if blob.get("fingerprint") == fp:
            model = build_model(tok.vocab_size)
            model.load_state_dict(blob["state_dict"])
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            log(f"loaded cached checkpoint {path.name}")
            return model, {"cached": True, "train_seconds": blob.get("train_seconds")}
        log("cached checkpoint does not match the configuration; retraining")
    t0 = time.time()
    model = train(tok, log)
    seconds = time.time() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save({"fingerprint": fp, "state_dict": model.state_dict(), "train_seconds": seconds}, path)
    size = path.stat().st_size
    if size > 3 * 2**20:
        path.unlink()
        log(f"checkpoint is {size / 2**20:.1f} MB (> 3 MB): not kept; rerun retrains deterministically")
    return model, {"cached": False, "train_seconds": seconds}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float((a @ b) / denom) if denom > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="ignore the cached checkpoint")
    parser.add_argument("--n-eval", type=int, default=60, help="clean prompts per analysis batch (x2: symmetric)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--threshold", type=float, default=0.85, help="accuracy a circuit must keep")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    tok = WordTokenizer.for_templates()
    model, train_info = load_or_train(tok, args.retrain, log)
    hm = HookedMamba(model)
    out: dict = {"config": CONFIG, "train": {**TRAIN, **train_info}, "vocab_size": tok.vocab_size,
                 "n_params": sum(p.numel() for p in model.parameters())}

    # ---- 2. accuracy per corruption kind on held-out prompts
    held_out = generate_pairs(500, seed=1, **_task())
    acc_kind: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for kind in CORRUPTIONS:
            pairs = [p for p in held_out if p.kind == kind]
            n_ok, n_top1, n, ld_c, ld_x = 0.0, 0.0, 0, [], []
            for b in tokenize_pairs(tok, pairs):
                lc, lx = hm(b.clean_tokens), hm(b.corrupt_tokens)
                n_ok += float(accuracy(lc, b.clean_answer, b.corrupt_answer)) * len(b)
                n_top1 += float(accuracy(lc, b.clean_answer)) * len(b)
                ld_c.append(logit_diff(lc, b.clean_answer, b.corrupt_answer))
                ld_x.append(logit_diff(lx, b.clean_answer, b.corrupt_answer))
                n += len(b)
            acc_kind[kind] = {"accuracy_vs_corrupt_answer": n_ok / n, "top1_accuracy": n_top1 / n,
                              "ld_clean": float(torch.cat(ld_c).mean()), "ld_corrupt": float(torch.cat(ld_x).mean()),
                              "n": n}
    out["accuracy"] = acc_kind
    log("accuracy: " + ", ".join(f"{k} {v['top1_accuracy']:.3f}" for k, v in acc_kind.items()))

    # ---- analysis batch: template 0, all corruption kinds, symmetric pairs
    pairs = generate_pairs(args.n_eval, seed=2, symmetric=True, **_task())
    (batch,) = tokenize_pairs(tok, pairs)
    clean, corrupt = batch.clean_tokens, batch.corrupt_tokens
    T = clean.shape[1]
    words = [tok.vocab[int(i)] for i in clean[0]]
    slot_at = {int(batch.positions[s][0]): s for s in SLOTS}
    varies = (clean != clean[:1]).any(0)
    labels = [slot_at.get(t, ("PLACE" if words[t] in PLACES else "OBJECT") if bool(varies[t]) else words[t])
              for t in range(T)]
    with torch.no_grad():
        lc, lx = hm(clean), hm(corrupt)
    metric = IOIMetric(lc, lx, batch)
    acc_fn = lambda logits: accuracy(logits, batch.clean_answer, batch.corrupt_answer)  # noqa: E731
    out["analysis_batch"] = {"n": len(batch), "template": 0, "tokens": words, "position_labels": labels,
                             "ld_clean": float(metric.ld_clean.mean()), "ld_corrupt": float(metric.ld_corrupt.mean()),
                             "accuracy_clean": float(acc_fn(lc)), "accuracy_corrupt": float(acc_fn(lx))}
    log(f"analysis batch: {len(batch)} pairs, T={T}, LD clean {out['analysis_batch']['ld_clean']:.2f} "
        f"corrupt {out['analysis_batch']['ld_corrupt']:.2f}")

    # ---- 3. activation patching per (layer, position), both directions
    sweeps = {}
    for direction in ("corrupt_into_clean", "clean_into_corrupt"):
        sweeps[direction] = patch_sweep(hm, clean, corrupt, metric, "hook_resid_pre", direction=direction)
    out["resid_patching"] = {d: s.tolist() for d, s in sweeps.items()}
    log("resid_pre patching done")

    # ---- 4. layer ablations
    ablations = {}
    for kind in ("zero", "mean", "resample"):
        ablations[kind] = {
            "accuracy": ablate_layers(hm, clean, acc_fn, kind, source=None).tolist(),
            "nld": ablate_layers(hm, clean, metric, kind).tolist(),
        }
    out["layer_ablation"] = {"baseline_accuracy": float(acc_fn(lc)), **ablations}
    log("ablations: zero-ablation accuracy per layer " + str([round(a, 3) for a in ablations["zero"]["accuracy"]]))

    # ---- 5. conv slices of the most important layer
    key_layer = int(torch.tensor(ablations["zero"]["nld"]).argmin())
    slices = conv_slice_patching(hm, clean, corrupt, metric, key_layer)
    out["conv_slice_patching"] = {"layer": key_layer, "offsets": list(range(-(slices.shape[0] - 1), 1)),
                                  "nld": slices.tolist()}
    log(f"conv slices of layer {key_layer} done")

    # ---- 6. positional EAP / EAP-IG / RelP on the layer graph, circuits
    graphs, circuits = {}, {}
    for method in METHODS:
        graphs[method] = edge_attribution_patching(hm, clean, corrupt, metric, method=method)
        found = find_circuit(hm, graphs[method], clean, corrupt, acc_fn, args.threshold, positional=True)
        circuits[method] = {"size": found.size, "of": int(graphs[method].scores.numel()), "accuracy": found.score,
                            "full_accuracy": found.full_score, "evaluations": found.evaluations,
                            "edges": [list(k) for k in found.keys]}
        log(f"{method}: circuit of {found.size}/{graphs[method].scores.numel()} edge-positions keeps "
            f"accuracy {found.score:.3f}")
    true_edges = _true_edge_effects(hm, clean, corrupt, metric, graphs["eap"])
    out["edges"] = {m: g.to_dict() for m, g in graphs.items()}
    out["edge_true_effects"] = true_edges.tolist()
    out["edge_correlation"] = {m: pearson(g.scores, true_edges) for m, g in graphs.items()}
    out["circuits"] = circuits
    graphs["relp"].to_json(str(RESULTS / "circuits_relp_graph.json"))
    log("edge correlation with true edge patching: " + str({k: round(v, 3) for k, v in out["edge_correlation"].items()}))

    # ---- 7. node estimates vs true activation patching
    corr = {}
    node_maps = {}
    first_diff = int((clean != corrupt).any(0).nonzero().min())
    with torch.no_grad():
        m_clean = float(metric(lc))
    for hook in NODE_HOOKS:
        true = (sweeps["corrupt_into_clean"] if hook == "hook_resid_pre"
                else patch_sweep(hm, clean, corrupt, metric, hook)) - m_clean
        est = {m: attribution_patching(hm, clean, corrupt, metric, hook, m) for m in METHODS}
        node_maps[hook] = {"true": true, **est}
        corr[hook] = {
            m: {"pearson_all": pearson(e, true), "pearson_from_first_change": pearson(e[:, first_diff:], true[:, first_diff:])}
            for m, e in est.items()
        }
        log(f"{hook}: " + ", ".join(f"{m} r={v['pearson_all']:.3f}" for m, v in corr[hook].items()))
    out["node_correlation"] = corr

    # ---- 8. which MambaLRP rule matters for RelP: one rule switched back to the gradient at a time
    variants = {"mambalrp": MAMBALRP, **{f"without-{c}": MAMBALRP.without(c) for c in ("silu", "gate", "norm", "ssm")},
                "gradient (= eap)": GRADIENT}
    out["relp_rule_ablation"] = {}
    for hook in NODE_HOOKS:
        true = node_maps[hook]["true"]
        out["relp_rule_ablation"][hook] = {
            name: pearson(attribution_patching(hm, clean, corrupt, metric, hook, "relp", relp_rules=rs), true)
            for name, rs in variants.items()
        }
        log(f"RelP rule ablation ({hook} Pearson): "
            + ", ".join(f"{k} {v:.3f}" for k, v in out["relp_rule_ablation"][hook].items()))

    # ---- 9. held-out check of the rule-ablation finding: a fresh batch (other names, places, order)
    held = tokenize_pairs(tok, generate_pairs(args.n_eval, seed=3, symmetric=True, **_task()))[0]
    hc, hx = held.clean_tokens, held.corrupt_tokens
    with torch.no_grad():
        hlc, hlx = hm(hc), hm(hx)
    hmetric = IOIMetric(hlc, hlx, held)
    check = {}
    for hook in ("hook_resid_pre", "hook_out_proj"):
        true = patch_sweep(hm, hc, hx, hmetric, hook) - float(hmetric(hlc))
        est = {m: attribution_patching(hm, hc, hx, hmetric, hook, m) for m in METHODS}
        est["relp (without-gate)"] = attribution_patching(hm, hc, hx, hmetric, hook, "relp",
                                                          relp_rules=MAMBALRP.without("gate"))
        check[hook] = {m: pearson(e, true) for m, e in est.items()}
        log(f"held-out batch {hook}: " + ", ".join(f"{m} r={v:.3f}" for m, v in check[hook].items()))
    out["held_out_check"] = {"seed": 3, "n": len(held), "pearson": check}
    out["node_maps"] = {h: {k: v.tolist() for k, v in d.items()} for h, d in node_maps.items()}
    out["first_changed_position"] = first_diff
    out["seconds"] = time.time() - t_start
    (RESULTS / "circuits_study.json").write_text(json.dumps(out, indent=1))
    log(f"wrote {RESULTS / 'circuits_study.json'}")
    if not args.no_plots:
        plot(out, sweeps, ablations, slices, graphs, node_maps, labels)
        log("wrote plots")


@torch.no_grad()
def _true_edge_effects(hm, clean, corrupt, metric, graph) -> torch.Tensor:
    """Patch each single (edge, position) and record the metric change: ``(n_edges, T)``."""
    from mambalrp.circuits import run_circuit

    base = float(metric(hm(clean)))
    out = torch.zeros(graph.scores.shape)
    full = torch.ones(graph.scores.shape, dtype=torch.bool)
    diff_positions = (clean != corrupt).any(0)
    for e in range(graph.scores.shape[0]):
        for t in range(graph.scores.shape[1]):
            if graph.edges[e][0] == "embed" and not bool(diff_positions[t]):
                continue  # the embedding is identical there: exactly no effect
            keep = full.clone()
            keep[e, t] = False
            out[e, t] = float(metric(run_circuit(hm, clean, corrupt, keep))) - base
    return out


def plot(out, sweeps, ablations, slices, graphs, node_maps, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(next(iter(sweeps.values())))
    fig, axes = plt.subplots(1, 2, figsize=(14, 3.6))
    for ax, (direction, s) in zip(axes, sweeps.items()):
        im = ax.imshow(s.numpy(), aspect="auto", cmap="RdBu", vmin=-1.2, vmax=1.2)
        ax.set_title(f"resid_pre patching, {direction} (NLD)")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(L), [f"L{l}" for l in range(L)])
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_patching_heatmap.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    x = torch.arange(L).float()
    for i, kind in enumerate(("zero", "mean", "resample")):
        axes[0].bar(x + (i - 1) * 0.27, ablations[kind]["accuracy"], width=0.27, label=kind)
        axes[1].bar(x + (i - 1) * 0.27, ablations[kind]["nld"], width=0.27, label=kind)
    axes[0].axhline(out["layer_ablation"]["baseline_accuracy"], color="k", lw=0.8, ls="--")
    for ax, name in zip(axes, ("accuracy", "NLD")):
        ax.set_xticks(range(L), [f"L{l}" for l in range(L)])
        ax.set_title(f"whole-layer ablation: {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_layer_ablation.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 2.6))
    im = ax.imshow(slices.numpy(), aspect="auto", cmap="RdBu", vmin=-1.2, vmax=1.2)
    ax.set_yticks(range(slices.shape[0]), out["conv_slice_patching"]["offsets"])
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_title(f"conv-slice patching, layer {out['conv_slice_patching']['layer']} (NLD; rows: offset)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_conv_slices.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (method, g) in zip(axes, graphs.items()):
        s = g.scores.numpy()
        v = abs(s).max() or 1.0
        im = ax.imshow(s, aspect="auto", cmap="RdBu", vmin=-v, vmax=v)
        ax.set_yticks(range(len(g.edges)), [f"{a}->{b}" for a, b in g.edges], fontsize=6)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
        ax.set_title(f"positional {method}: edge x position")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_positional_eap.png", dpi=120)
    plt.close(fig)

    # the circuit found with RelP's ranking as a layered graph
    g = graphs["relp"]
    nodes = g.nodes
    keep = set((k[0], k[1]) for k in out["circuits"]["relp"]["edges"])
    fig, ax = plt.subplots(figsize=(5, 6))
    ypos = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        ax.scatter([0], [ypos[n]], s=300, color="lightgrey", zorder=3)
        ax.text(0, ypos[n], n, ha="center", va="center", fontsize=8, zorder=4)
    for e, (a, b) in enumerate(g.edges):
        if (a, b) not in keep:
            continue
        w = float(g.edge_scores[e])
        bend = 0.15 * (ypos[b] - ypos[a])
        ax.annotate("", xy=(0, ypos[b]), xytext=(0, ypos[a]),
                    arrowprops=dict(arrowstyle="->", color="tab:red" if w > 0 else "tab:blue",
                                    lw=0.5 + 3 * abs(w) / (g.edge_scores.abs().max().item() or 1),
                                    connectionstyle=f"arc3,rad={bend}"))
    ax.set_xlim(-1, 1)
    ax.axis("off")
    ax.set_title("circuit (RelP ranking, positional search)\nred: positive score, blue: negative", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_relp_circuit.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(node_maps), figsize=(5 * len(node_maps), 4.2))
    for ax, (hook, maps) in zip(axes, node_maps.items()):
        true = maps["true"].flatten()
        for method in METHODS:
            r = out["node_correlation"][hook][method]["pearson_all"]
            ax.scatter(true, maps[method].flatten(), s=8, alpha=0.6, label=f"{method} (r={r:.2f})")
        lim = max(true.abs().max().item(), 1e-6)
        ax.plot([-lim, lim], [-lim, lim], color="k", lw=0.6)
        ax.set_xlabel("true patching effect (NLD)")
        ax.set_ylabel("estimate")
        ax.set_title(hook)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "circuits_estimates_vs_patching.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
