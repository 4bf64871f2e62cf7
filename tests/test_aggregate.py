"""Word-level aggregation and explicit spans: groups from subword markers, sums, conservation."""

from __future__ import annotations

import pytest
import torch

import mambalrp
from mambalrp.aggregate import check_spans
from mambalrp.explanation import Explanation
from mambalrp.testing import tiny_mamba
from mambalrp.tokens import join_tokens, word_spans

G, S = "\u0120", "\u2581"  # byte-level BPE and SentencePiece space markers


def test_word_spans_byte_level_bpe():
    tokens = [G, "T", "he", G + "film", G + "un", "bel", "iev", "able", ",", G + "really", "\u010a", "Next"]
    spans = word_spans(tokens)
    assert spans == [(0, 3), (3, 4), (4, 8), (8, 9), (9, 10), (10, 11), (11, 12)] or spans == [
        (0, 3), (3, 4), (4, 9), (9, 10), (10, 11), (11, 12)]
    words = [join_tokens(tokens[a:b]) for a, b in spans]
    assert words[0] == "The" and words[1] == "film" and words[2].startswith("unbelievable")


def test_word_spans_sentencepiece_wordpiece_and_specials():
    sp = ["<s>", S + "The", S + "un", "believ", "able", S + "end", "</s>"]
    assert word_spans(sp) == [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7)]
    assert [join_tokens(sp[a:b]) for a, b in word_spans(sp)] == ["<s>", "The", "unbelievable", "end", "</s>"]
    wp = ["[CLS]", "the", "un", "##believ", "##able", "film", "[SEP]"]
    assert word_spans(wp) == [(0, 1), (1, 2), (2, 5), (5, 6), (6, 7)]
    assert join_tokens(wp[2:5]) == "unbelievable"
    assert word_spans([]) == [] and word_spans(["x"]) == [(0, 1)]
    # Spans always cover every token exactly once, in order.
    for tokens in (sp, wp, [G, G, "a", G, "\u010a", "\u010a", "b"]):
        spans = word_spans(tokens)
        assert [j for a, b in spans for j in range(a, b)] == list(range(len(tokens)))


def _synthetic(kind: str = "output") -> Explanation:
    gen = torch.Generator().manual_seed(0)
    tokens = [G + "The", G + "un", "bel", "ievable", G + "film", "."]
    rel = torch.randn(2, 6, generator=gen)
    return Explanation(
        relevance=rel,
        logit=rel.sum(-1) + 0.25,
        target=torch.tensor([1, 2]),
        position=torch.tensor([5, 5]),
        input_ids=torch.arange(12).view(2, 6),
        attention_mask=None,
        rules="mambalrp",
        hidden_relevance=torch.randn(2, 6, 3, generator=gen),
        tokens=[tokens, tokens],
    )


def test_words_sum_relevance_and_keep_conservation():
    exp = _synthetic()
    words = exp.aggregate("words")
    assert words.tokens == [["The", "unbelievable", "film."]] * 2
    assert words.spans == [[(0, 1), (1, 4), (4, 6)]] * 2
    assert torch.allclose(words.relevance[:, 1], exp.relevance[:, 1:4].sum(-1))
    assert torch.allclose(words.relevance.sum(-1), exp.relevance.sum(-1), atol=1e-6)
    assert torch.allclose(words.conservation_delta, exp.conservation_delta, atol=1e-6)
    assert torch.allclose(words.hidden_relevance.sum(1), exp.hidden_relevance.sum(1), atol=1e-6)
    assert torch.equal(words.input_ids, exp.input_ids)  # ids stay token-level
    with pytest.raises(ValueError, match="already aggregated"):
        words.aggregate("words")


def test_explicit_spans():
    exp = _synthetic()
    grouped = exp.aggregate([(1, 4), (4, 6)])
    assert grouped.spans[0] == [(0, 1), (1, 4), (4, 6)]
    assert torch.allclose(grouped.relevance[:, 2], exp.relevance[:, 4:].sum(-1))
    assert torch.allclose(grouped.relevance.sum(-1), exp.relevance.sum(-1), atol=1e-6)
    no_tokens = Explanation(**{**exp.__dict__, "tokens": None})
    assert no_tokens.aggregate([(2, 3)]).spans[0] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    with pytest.raises(mambalrp.InputError, match="needs the token strings"):
        no_tokens.aggregate("words")
    for bad, match in [([(0, 3), (2, 5)], "overlap"), ([(4, 9)], "outside"), ([(3, 3)], "empty"),
                       ([(1,)], "pairs"), ("letters", "words")]:
        with pytest.raises(mambalrp.InputError, match=match):
            exp.aggregate(bad)
    assert check_spans([(0, 6)], 6) == [(0, 6)]


def test_padded_batch_and_generation_from_a_model():
    model = tiny_mamba(31)

    class Vocab:
        def id_to_token(self, i: int) -> str:
            return f"{G}w{i}" if i % 3 == 0 else f"p{i}"

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    exp = mambalrp.explain(model, ids, attention_mask=mask, tokenizer=Vocab())
    words = exp.aggregate("words")
    assert torch.allclose(words.relevance.sum(-1), exp.relevance.sum(-1), atol=1e-5)
    assert words.spans[0][:3] == [(0, 1), (1, 2), (2, 3)]  # padding grouped alone
    assert all(len(row) == len(spans) for row, spans in zip(words.tokens, words.spans))
    gen = mambalrp.explain_generation(model, ids[1], max_new_tokens=3, tokenizer=Vocab())
    gw = gen.aggregate("words")
    assert torch.allclose(gw.relevance.sum(-1), gen.relevance.sum(-1), atol=1e-5)
    assert torch.allclose(gw.conservation_delta, gen.conservation_delta, atol=1e-5)
    table = pytest.importorskip("pandas") and gw.to_pandas()
    assert set(table["token_id"]) == {-1}
