"""Circuit analysis: hooks, IOI data, patching, EAP and relevance patching on tiny random models."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, assert_same_state, snapshot
from mambalrp.circuits import HookedMamba

ALL = lambda name: True  # noqa: E731


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids thread start-up and contention costs; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokens(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- hooks
def test_no_hook_forward_is_bitwise_plain(family):
    model = FAMILIES[family](0)
    hm = HookedMamba(model)
    toks = _tokens()
    with torch.no_grad():
        plain = model(toks, use_cache=False).logits
        hooked = hm.run_with_hooks(toks)
        with hm.hooks():
            in_context = hm(toks)
    assert torch.equal(plain, hooked)
    assert torch.equal(plain, in_context)


def test_no_hook_call_installs_nothing():
    model = FAMILIES["mamba"](0)
    hm = HookedMamba(model)
    seen = []

    def spy(module, args, output):
        # while the model runs under a hook-free wrapper call, no other hook or patched forward exists
        seen.append([(n, len(m._forward_hooks) + len(m._forward_pre_hooks), "forward" in m.__dict__)
                     for n, m in model.named_modules() if m is not model.lm_head])

    handle = model.lm_head.register_forward_hook(spy)
    try:
        with torch.no_grad():
            hm(_tokens())
            hm.run_with_hooks(_tokens(), fwd_hooks=[("blocks.0.hook_y", lambda a, h: None)])
    finally:
        handle.remove()
    assert all(k == 0 and not patched for _, k, patched in seen[0])
    assert any(patched for _, _, patched in seen[1])  # a mixer-internal hook runs the mixers through adapters


def test_cache_holds_every_documented_hook(family):
    model = FAMILIES[family](0)
    hm = HookedMamba(model)
    toks = _tokens(batch=3, seq=6)
    with torch.no_grad():
        plain = model(toks, use_cache=False).logits
        logits, cache = hm.run_with_cache(toks, names_filter=ALL)
    shapes = hm.hook_shapes(3, 6)
    assert set(cache) == set(shapes) == set(hm.hook_names)
    for name, shape in shapes.items():
        assert tuple(cache[name].shape) == shape, name
    # the adapter path computes the same function
    torch.testing.assert_close(logits, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache["hook_logits"], plain, rtol=1e-4, atol=1e-4)
    # independent checks of a few shapes and of the block algebra
    mixer = hm.structure.mixers[0]
    n, K = mixer.ssm_state_size, mixer.conv1d.weight.shape[-1]
    if family == "mamba2":
        assert cache["blocks.0.hook_h"].shape == (3, 6, mixer.num_heads, mixer.head_dim, n)
        assert cache["blocks.0.hook_A_bar"].shape == (3, 6, mixer.num_heads)
    else:
        assert cache["blocks.0.hook_h"].shape == (3, 6, mixer.intermediate_size, n)
    assert cache["blocks.1.hook_conv_slice"].shape[2] == K
    for l in range(hm.n_layers):
        torch.testing.assert_close(
            cache[f"blocks.{l}.hook_resid_post"],
            cache[f"blocks.{l}.hook_resid_pre"] + cache[f"blocks.{l}.hook_out_proj"],
        )
        assert torch.equal(cache[f"blocks.{l}.hook_layer_input"], cache[f"blocks.{l}.hook_resid_pre"])
    conv = cache["blocks.1.hook_conv_slice"].sum(2) + hm.structure.mixers[1].conv1d.bias
    torch.testing.assert_close(conv, cache["blocks.1.hook_conv"], rtol=1e-5, atol=1e-5)
    # default filter: everything but the on-request hooks
    _, default = hm.run_with_cache(toks)
    assert "blocks.0.hook_h" not in default and "blocks.0.hook_conv_slice" not in default
    assert "blocks.0.hook_ssm_input" in default and "hook_embed" in default


@pytest.mark.parametrize("family_name", ["mamba", "mamba2"])
def test_patching_a_hook_with_its_clean_value_changes_nothing(family_name):
    model = FAMILIES[family_name](1)
    hm = HookedMamba(model)
    toks = _tokens(1)
    kinds = [n for n in hm.hook_names if n.startswith("blocks.0.") or not n.startswith("blocks.")]
    with torch.no_grad():
        for name in kinds:
            clean, cache = hm.run_with_cache(toks, names_filter=[name])
            patched = hm.run_with_hooks(toks, fwd_hooks=[(name, lambda a, h: cache[h.name].clone())])
            assert torch.equal(clean, patched), name
            if not name.endswith(("hook_resid_pre", "hook_conv_slice", "hook_h", "hook_in_proj_z", "hook_gate")):
                continue
            changed = hm.run_with_hooks(toks, fwd_hooks=[(name, lambda a, h: cache[h.name] + 1.0)])
            assert not torch.allclose(clean, changed), f"patching {name} has no effect"


def test_model_restored_after_calls_and_errors(family):
    model = FAMILIES[family](2)
    model.backbone.layers[0].mixer.in_proj.weight.requires_grad_(False)
    before = snapshot(model)
    hm = HookedMamba(model)
    toks = _tokens()
    hm.run_with_cache(toks, names_filter=ALL, incl_bwd=True, metric=lambda l: l[:, -1].sum())
    hm.run_with_hooks(toks, rules="mambalrp")
    assert_same_state(model, before)

    class Boom(RuntimeError):
        pass

    def boom(act, hook):
        raise Boom(hook.name)

    for name in ("blocks.1.hook_ssm_input", "blocks.0.hook_resid_post", "blocks.1.hook_h", "hook_logits"):
        with pytest.raises(Boom):
            hm.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, h: a * 1.0), (name, boom)])
        assert_same_state(model, before)
    with pytest.raises(Boom), hm.hooks(fwd_hooks=[("blocks.0.hook_y", boom)]):
        hm(toks)
    assert_same_state(model, before)
    with pytest.raises(ValueError, match="shape"):
        hm.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_delta", lambda a, h: a[:, :1])])
    assert_same_state(model, before)
    with torch.no_grad():
        assert torch.equal(hm(toks), model(toks, use_cache=False).logits)


def test_hooks_context_and_backward_hooks():
    model = FAMILIES["mamba"](3)
    hm = HookedMamba(model)
    toks = _tokens(3)
    zero = ("blocks.1.hook_out_proj", lambda a, h: torch.zeros_like(a))
    with torch.no_grad():
        plain = hm(toks)
        with hm.hooks(fwd_hooks=[zero]):
            inside = hm(toks)
        after = hm(toks)
        direct = hm.run_with_hooks(toks, fwd_hooks=[zero])
    assert torch.equal(inside, direct) and torch.equal(after, plain) and not torch.equal(inside, plain)

    metric = lambda logits: logits[:, -1, 5].sum()  # noqa: E731
    _, cache = hm.run_with_cache(toks, names_filter="blocks.1.hook_resid_pre", incl_bwd=True, metric=metric)
    seen = {}

    def grab(grad, hook):
        seen[hook.name] = grad.clone()

    for p in model.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    logits = hm.run_with_hooks(toks, bwd_hooks=[("blocks.1.hook_resid_pre", grab)])
    metric(logits).backward()
    torch.testing.assert_close(seen["blocks.1.hook_resid_pre"], cache["blocks.1.hook_resid_pre_grad"])
    assert_same_state(model, before)
    with pytest.raises(KeyError):
        hm.run_with_hooks(toks, fwd_hooks=[("blocks.9.hook_nope", grab)])


# ------------------------------------------------------------------------------------------ IOI
from mambalrp.circuits import ioi  # noqa: E402


def test_corruption_kinds_match_their_documented_patterns():
    clean = ioi.IOIPrompt(0, ("Alice", "Bob", "Carol"), ("Alice", "Bob"), "store", "drink")
    assert clean.text == "Then, Alice, Bob and Carol went to the store. Alice and Bob gave a drink to"
    assert clean.answer == "Carol" and clean.pattern == "ABC AB C"
    expected = {
        "new_answer": "ABD AB D",
        "clause_first_to_answer": "ABC CB A",
        "clause_second_to_answer": "ABC AC B",
        "swap_answer_first": "CBA CB A",
        "swap_answer_second": "ACB AC B",
    }
    assert set(expected) == set(ioi.CORRUPTIONS)
    for kind, pattern in expected.items():
        pair = ioi.IOIPair(clean, ioi.corrupt(clean, kind, new_name="David"), kind)
        assert pair.patterns() == ("ABC AB C", pattern), kind
        assert pair.corrupt.answer != clean.answer
    with pytest.raises(ValueError):
        ioi.corrupt(clean, "new_answer", new_name="Bob")


def test_ioi_batches_differ_only_at_replaced_names_and_positions_are_right():
    tok = ioi.WordTokenizer.for_templates()
    names = ioi.single_token_names(tok)
    assert names == list(ioi.NAMES)
    assert ioi.single_token_names(tok, ["Alice", "Zorblax", "Mary-Ann"]) == ["Alice"]  # unknown; 3 tokens
    pairs = ioi.generate_pairs(40, names=names, seed=3, symmetric=True)
    assert pairs == ioi.generate_pairs(40, names=names, seed=3, symmetric=True)
    assert pairs != ioi.generate_pairs(40, names=names, seed=4, symmetric=True)
    assert {p.kind.split(":")[0] for p in pairs} == set(ioi.CORRUPTIONS)
    batches = ioi.tokenize_pairs(tok, pairs)
    assert sum(len(b) for b in batches) == 80
    for b in batches:
        for i, pair in enumerate(b.pairs):
            clean, corr = b.clean_tokens[i], b.corrupt_tokens[i]
            for slot in ioi.SLOTS:
                pos = int(b.positions[slot][i])
                assert tok.vocab[int(clean[pos])] == pair.clean.fill()[slot]
                assert tok.vocab[int(corr[pos])] == pair.corrupt.fill()[slot]
            changed = {int(b.positions[s][i]) for s in pair.changed_slots()}
            assert changed, pair
            assert set((clean != corr).nonzero().flatten().tolist()) == changed
            assert tok.vocab[int(b.clean_answer[i])] == pair.clean.answer
            assert tok.vocab[int(b.corrupt_answer[i])] == pair.corrupt.answer
            assert int(b.positions["END"][i]) == clean.shape[0] - 1


def test_ioi_positions_with_a_byte_level_bpe_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    texts = [p.clean.text + " " + p.clean.answer for p in ioi.generate_pairs(200, seed=0)]
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    names = ioi.single_token_names(tok)
    assert 4 <= len(names) < len(ioi.NAMES)  # rare names are split by this small BPE
    for b in ioi.tokenize_pairs(tok, ioi.generate_pairs(30, names=names, seed=1, symmetric=True)):
        for i, pair in enumerate(b.pairs):
            tokens = tok.convert_ids_to_tokens(b.clean_tokens[i].tolist())
            for slot in ioi.SLOTS:
                assert tokens[int(b.positions[slot][i])] == "\u0120" + pair.clean.fill()[slot]
            changed = {int(b.positions[s][i]) for s in pair.changed_slots()}
            assert set((b.clean_tokens[i] != b.corrupt_tokens[i]).nonzero().flatten().tolist()) == changed


def test_ioi_metrics():
    logits = torch.zeros(3, 2, 5)
    logits[:, -1] = torch.tensor([[3.0, 1, 0, 0, 0], [0, 2.0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]])
    correct, wrong = torch.tensor([0, 0, 0]), torch.tensor([1, 1, 1])
    assert torch.equal(ioi.logit_diff(logits, correct, wrong), torch.tensor([2.0, -2.0, 0.0]))
    assert ioi.accuracy(logits, correct, wrong).item() == pytest.approx(1 / 3)
    assert ioi.accuracy(logits, correct).item() == pytest.approx(2 / 3)  # arg-max ties resolve to 0
    ld_clean, ld_corr = torch.tensor([4.0, 2.0]), torch.tensor([-1.0, -1.0])
    assert ioi.normalized_logit_diff(ld_clean, ld_clean, ld_corr).item() == pytest.approx(1.0)
    assert ioi.normalized_logit_diff(ld_corr, ld_clean, ld_corr).item() == pytest.approx(0.0)
    assert ioi.normalized_logit_diff(torch.tensor([1.0]), ld_clean, ld_corr).item() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------- patching
import copy  # noqa: E402

from mambalrp import circuits as C  # noqa: E402


def _pair(seed=0, n=3, t=6, pos=2):
    clean = _tokens(seed, n, t)
    corrupt = clean.clone()
    corrupt[:, pos] = (corrupt[:, pos] + 7) % 64
    return clean, corrupt


def _metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()


def test_patch_sweep_properties():
    hm = HookedMamba(FAMILIES["mamba"](4, num_hidden_layers=3))
    clean, corrupt = _pair(4)
    with torch.no_grad():
        m_clean, m_corrupt = float(_metric(hm(clean))), float(_metric(hm(corrupt)))
    assert abs(m_clean - m_corrupt) > 1e-3
    for direction, base, other in (("corrupt_into_clean", m_clean, m_corrupt), ("clean_into_corrupt", m_corrupt, m_clean)):
        sweep = C.patch_sweep(hm, clean, corrupt, _metric, "hook_resid_pre", direction=direction, positions_per_run=4)
        assert sweep.shape == (3, 6)
        # layer 0's residual input is the embedding: patching the one differing position swaps the prompt
        assert sweep[0, 2].item() == pytest.approx(other, abs=1e-5)
        # positions before the difference carry identical activations; at layer 0 only position 2 differs
        torch.testing.assert_close(sweep[:, :2], torch.full((3, 2), base), atol=1e-5, rtol=0)
        torch.testing.assert_close(sweep[0, 3:], torch.full((3,), base), atol=1e-5, rtol=0)
    same = C.patch_sweep(hm, clean, clean, _metric, "hook_ssm_input", layers=[1])
    torch.testing.assert_close(same, torch.full((1, 6), m_clean), atol=1e-5, rtol=0)
    slices = C.conv_slice_patching(hm, clean, corrupt, _metric, layer=0)
    K = hm.structure.mixers[0].conv1d.weight.shape[-1]
    # slice k at position t reads the input K-1-k positions back: it sees position 2 only at t = 2 + K-1-k
    for k in range(K):
        for t in range(6):
            if t != 2 + (K - 1 - k):
                assert slices[k, t].item() == pytest.approx(m_clean, abs=1e-5), (k, t)
    assert (slices - m_clean).abs().max() > 1e-4


def test_layer_ablations():
    model = FAMILIES["mamba"](5, num_hidden_layers=3)
    hm = HookedMamba(model)
    toks = _tokens(5, 4, 6)
    zero = C.ablate_layers(hm, toks, _metric, "zero")
    for l in range(3):
        ablated = copy.deepcopy(model)
        with torch.no_grad():
            ablated.backbone.layers[l].mixer.out_proj.weight.zero_()
            assert zero[l].item() == pytest.approx(float(_metric(ablated(toks, use_cache=False).logits)), abs=1e-5)
    same = toks[:1].expand(4, -1)
    with torch.no_grad():
        m_same = float(_metric(hm(same)))
    torch.testing.assert_close(C.ablate_layers(hm, same, _metric, "mean"), torch.full((3,), m_same), atol=1e-5, rtol=0)
    torch.testing.assert_close(C.ablate_layers(hm, same, _metric, "resample"), torch.full((3,), m_same), atol=1e-5, rtol=0)
    assert not torch.allclose(C.ablate_layers(hm, toks, _metric, "resample"), zero)


@pytest.mark.parametrize("family_name", ["mamba", "mamba2"])
def test_eap_equals_first_order_taylor_term(family_name):
    hm = HookedMamba(FAMILIES[family_name](6, num_hidden_layers=3))
    clean, corrupt = _pair(6)
    ea = C.edge_attribution_patching(hm, clean, corrupt, _metric, method="eap")
    assert ea.edges == C.graph_edges(3) and len(ea.edges) == 10 and ea.scores.shape == (10, 6)
    _, cc = hm.run_with_cache(clean)
    _, xc = hm.run_with_cache(corrupt)
    out = lambda node: "hook_embed" if node == "embed" else f"blocks.{node[1:]}.hook_out_proj"  # noqa: E731
    inp = lambda node: "hook_resid_final" if node == "output" else f"blocks.{node[1:]}.hook_layer_input"  # noqa: E731
    for e, (src, dst) in enumerate(ea.edges):
        delta = xc[out(src)] - cc[out(src)]
        alpha = torch.zeros(6, requires_grad=True)
        logits = hm.run_with_hooks(clean, fwd_hooks=[(inp(dst), lambda a, h: a + alpha[None, :, None] * delta)])
        (direct,) = torch.autograd.grad(_metric(logits), alpha)
        torch.testing.assert_close(ea.scores[e], direct, rtol=1e-4, atol=1e-6)
        # and it is the derivative of the edge-patched metric: finite difference along the edge
        eps = 1e-3
        with torch.no_grad():
            m0 = _metric(hm.run_with_hooks(clean, fwd_hooks=[(inp(dst), lambda a, h: a - eps * delta)]))
            m1 = _metric(hm.run_with_hooks(clean, fwd_hooks=[(inp(dst), lambda a, h: a + eps * delta)]))
        assert ((m1 - m0) / (2 * eps)).item() == pytest.approx(ea.edge_scores[e].item(), rel=0.02, abs=2e-3)
    assert ea.scores[:, :2].abs().max() == 0  # nothing differs before position 2
    assert ea.scores.abs().max() > 1e-3
    # relevance patching differs from EAP only by the rules of the backward pass
    relp_grad = C.edge_attribution_patching(hm, clean, corrupt, _metric, method="relp", relp_rules="gradient")
    torch.testing.assert_close(relp_grad.scores, ea.scores, rtol=1e-4, atol=1e-5)
    relp = C.edge_relevance_patching(hm, clean, corrupt, _metric)
    assert not torch.allclose(relp.scores, ea.scores, atol=1e-3)
    nodes_eap = C.attribution_patching(hm, clean, corrupt, _metric, "hook_resid_pre", "eap")
    _, g = hm.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"), incl_bwd=True, metric=_metric)
    manual = torch.stack([((xc[f"blocks.{l}.hook_resid_pre"] - cc[f"blocks.{l}.hook_resid_pre"])
                           * g[f"blocks.{l}.hook_resid_pre_grad"]).sum((0, 2)) for l in range(3)])
    torch.testing.assert_close(nodes_eap, manual, rtol=1e-4, atol=1e-6)
    ig = C.attribution_patching(hm, clean, corrupt, _metric, "hook_resid_pre", "eap-ig", ig_steps=3)
    assert ig.shape == (3, 6) and not torch.allclose(ig, nodes_eap, atol=1e-4)


def test_circuit_evaluation_and_search(tmp_path):
    hm = HookedMamba(FAMILIES["mamba"](7, num_hidden_layers=2))
    clean, corrupt = _pair(7)
    ea = C.edge_attribution_patching(hm, clean, corrupt, _metric)
    full = torch.ones(ea.scores.shape, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(C.run_circuit(hm, clean, corrupt, full), hm(clean))
        torch.testing.assert_close(C.run_circuit(hm, clean, corrupt, ~full), hm(corrupt), atol=1e-5, rtol=1e-5)
        m_clean, m_corrupt = float(_metric(hm(clean))), float(_metric(hm(corrupt)))
    threshold = m_corrupt + 0.7 * (m_clean - m_corrupt)
    score = _metric if m_clean > m_corrupt else (lambda l: -_metric(l))
    threshold = threshold if m_clean > m_corrupt else -threshold
    for positional in (False, True):
        found = C.find_circuit(hm, ea, clean, corrupt, score, threshold, positional=positional)
        assert found.score >= threshold
        with torch.no_grad():
            assert found.full_score == pytest.approx(float(score(hm(clean))))
        assert int(found.mask.sum()) == (found.size if positional else found.size * clean.shape[1])
        smaller = dict(found.evaluations).get(found.size - 1)
        if smaller is not None:
            assert smaller < threshold
    data = ea.to_dict()
    assert [(e["src"], e["dst"]) for e in data["edges"]] == ea.edges
    ea.to_json(str(tmp_path / "g.json"))
    assert (tmp_path / "g.json").read_text().startswith("{")
    nx = pytest.importorskip("networkx")
    g = ea.to_networkx(found.mask)
    assert isinstance(g, nx.DiGraph) and set(g.nodes) == set(ea.nodes)
