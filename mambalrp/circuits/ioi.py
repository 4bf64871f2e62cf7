"""Indirect object identification (IOI) with three names: prompts, corruptions and metrics.

A clean prompt names three people, then repeats two of them; the answer is the third::

    "Then, Alice, Bob and Carol went to the store. Alice and Bob gave a drink to" -> " Carol"

In the pattern notation ``ABC AB C`` the first group is the three names of the first clause (the
*prefix* slots ``P0 P1 P2``), the second the two names of the second clause (the *clause* slots
``R0 R1``), the last the answer. A corrupted prompt changes names so that the answer changes; the
five corruption kinds (:data:`CORRUPTIONS`), written for the clean pattern ``ABC AB C``:

==========================  ==================  =============================================
kind                        corrupted           what changes
==========================  ==================  =============================================
``new_answer``              ``ABD AB D``        the answer's name is replaced everywhere by a
                                                name not in the prompt
``clause_first_to_answer``  ``ABC CB A``        the first repeated name (R0) becomes the answer
                                                name, so R0's old name is now the answer
``clause_second_to_answer`` ``ABC AC B``        the same for the second repeated name (R1)
``swap_answer_first``       ``CBA CB A``        the answer's name and R0's name swap everywhere
``swap_answer_second``      ``ACB AC B``        the answer's name and R1's name swap everywhere
==========================  ==================  =============================================

Clean and corrupted prompts differ only at the slots listed by :meth:`IOIPair.changed_slots`
(names are single tokens, so token positions line up). Every corrupted prompt is itself a valid
IOI prompt, so a pair can be used in both directions (``symmetric=True`` adds the reversed pair).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

NAMES = (
    "Mary", "John", "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James",
    "Kate", "Laura", "Mark", "Nancy", "Oliver", "Paul", "Rachel", "Sam", "Tom", "Victor", "Wendy", "Adam",
    "Anna", "Ben", "Chris", "Daniel", "Eric", "George", "Jack", "Lisa", "Lucy", "Max", "Peter", "Sarah",
)
PLACES = ("store", "park", "school", "station", "office", "garden", "market", "beach", "library", "house")
OBJECTS = ("drink", "book", "ball", "letter", "gift", "key", "ring", "apple", "snack", "bag")
TEMPLATES = (
    "Then, {P0}, {P1} and {P2} went to the {PLACE}. {R0} and {R1} gave a {OBJECT} to",
    "Then, {P0}, {P1} and {P2} had a long day at the {PLACE}. {R0} and {R1} gave a {OBJECT} to",
    "When {P0}, {P1} and {P2} got to the {PLACE}, {R0} and {R1} handed a {OBJECT} to",
    "After {P0}, {P1} and {P2} arrived at the {PLACE}, {R0} and {R1} gave a {OBJECT} to",
    "While {P0}, {P1} and {P2} were at the {PLACE}, {R0} and {R1} passed a {OBJECT} to",
)
SLOTS = ("P0", "P1", "P2", "R0", "R1")
CORRUPTIONS = (
    "new_answer", "clause_first_to_answer", "clause_second_to_answer", "swap_answer_first", "swap_answer_second",
)


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt.

    Attributes:
        template: Index into the template list used.
        prefix: The three names of the first clause (slots P0, P1, P2).
        clause: The two repeated names of the second clause (slots R0, R1).
        place: Filler of ``{PLACE}``.
        obj: Filler of ``{OBJECT}``.
        templates: The template strings (default :data:`TEMPLATES`).
    """

    template: int
    prefix: tuple[str, str, str]
    clause: tuple[str, str]
    place: str
    obj: str
    templates: tuple[str, ...] = TEMPLATES

    @property
    def answer(self) -> str:
        """The prefix name that the second clause does not repeat."""
        rest = [n for n in self.prefix if n not in self.clause]
        valid = len(set(self.prefix)) == 3 and len(set(self.clause)) == 2 and set(self.clause) <= set(self.prefix)
        if not valid or len(rest) != 1:
            raise ValueError(f"not a valid IOI prompt: prefix {self.prefix}, clause {self.clause}")
        return rest[0]

    @property
    def pattern(self) -> str:
        """The prompt in ``ABC AB C`` notation (letters in order of first appearance)."""
        return self.pattern_with({})

    def pattern_with(self, letters: dict[str, str]) -> str:
        """The pattern with given letters for some names (others get the next free letters; updated in place)."""
        for n in (*self.prefix, *self.clause, self.answer):
            if n not in letters:
                letters[n] = "ABCDEFG"[len(letters)]
        return ("".join(letters[n] for n in self.prefix) + " " + "".join(letters[n] for n in self.clause)
                + " " + letters[self.answer])

    def fill(self) -> dict[str, str]:
        """Placeholder values, by slot name."""
        return {"P0": self.prefix[0], "P1": self.prefix[1], "P2": self.prefix[2], "R0": self.clause[0],
                "R1": self.clause[1], "PLACE": self.place, "OBJECT": self.obj}

    @property
    def text(self) -> str:
        """The prompt text (without the answer)."""
        return self.templates[self.template].format(**self.fill())

    def slot_spans(self) -> dict[str, tuple[int, int]]:
        """Character span ``[start, end)`` of each name slot in :attr:`text`."""
        template = self.templates[self.template]
        values = self.fill()
        spans, out, pos = {}, [], 0
        for m in re.finditer(r"\{(\w+)\}", template):
            out.append(template[pos : m.start()])
            start = sum(len(s) for s in out)
            out.append(values[m.group(1)])
            if m.group(1) in SLOTS:
                spans[m.group(1)] = (start, start + len(values[m.group(1)]))
            pos = m.end()
        return spans


def corrupt(prompt: IOIPrompt, kind: str, new_name: str | None = None) -> IOIPrompt:
    """The corrupted version of ``prompt`` (see the module docstring for the five kinds).

    Args:
        prompt: A clean prompt.
        kind: One of :data:`CORRUPTIONS`.
        new_name: The fresh name for ``"new_answer"`` (must not be in the prompt).

    Returns:
        A valid IOI prompt whose answer differs from ``prompt``'s.
    """
    x = prompt.answer
    r0, r1 = prompt.clause
    if kind == "new_answer":
        if new_name is None or new_name in prompt.prefix:
            raise ValueError("new_answer needs a new_name that is not in the prompt")
        mapping = {x: new_name}
        prefix = tuple(mapping.get(n, n) for n in prompt.prefix)
        return IOIPrompt(prompt.template, prefix, prompt.clause, prompt.place, prompt.obj, prompt.templates)
    if kind == "clause_first_to_answer":
        return IOIPrompt(prompt.template, prompt.prefix, (x, r1), prompt.place, prompt.obj, prompt.templates)
    if kind == "clause_second_to_answer":
        return IOIPrompt(prompt.template, prompt.prefix, (r0, x), prompt.place, prompt.obj, prompt.templates)
    if kind in ("swap_answer_first", "swap_answer_second"):
        other = r0 if kind == "swap_answer_first" else r1
        swap = {x: other, other: x}
        prefix = tuple(swap.get(n, n) for n in prompt.prefix)
        clause = tuple(swap.get(n, n) for n in prompt.clause)
        return IOIPrompt(prompt.template, prefix, clause, prompt.place, prompt.obj, prompt.templates)
    raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


@dataclass(frozen=True)
class IOIPair:
    """A clean prompt, its corrupted version and the corruption kind."""

    clean: IOIPrompt
    corrupt: IOIPrompt
    kind: str

    def changed_slots(self) -> list[str]:
        """Name slots whose name differs between clean and corrupted."""
        a, b = self.clean.fill(), self.corrupt.fill()
        return [s for s in SLOTS if a[s] != b[s]]

    def patterns(self) -> tuple[str, str]:
        """Clean and corrupted patterns in the clean prompt's letters, e.g. ``("ABC AB C", "ABD AB D")``."""
        letters: dict[str, str] = {}
        return self.clean.pattern_with(letters), self.corrupt.pattern_with(letters)

    def reversed(self) -> IOIPair:
        """The same pair with clean and corrupted exchanged."""
        return IOIPair(self.corrupt, self.clean, self.kind + ":reversed")


def single_token_names(tokenizer: Any, names: Sequence[str] = NAMES) -> list[str]:
    """The names that ``tokenizer`` encodes as one token after a space (as they appear in prompts)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for n in names:
        ids = _encode(tokenizer, " " + n)
        if len(ids) == 1 and ids[0] != unk and len(_encode(tokenizer, ", " + n)) == 2:
            out.append(n)
    return out


def generate_pairs(
    n: int,
    *,
    names: Sequence[str] = NAMES,
    kinds: Sequence[str] = CORRUPTIONS,
    templates: Sequence[int] | None = None,
    places: Sequence[str] = PLACES,
    objects: Sequence[str] = OBJECTS,
    symmetric: bool = False,
    seed: int = 0,
    template_strings: tuple[str, ...] = TEMPLATES,
) -> list[IOIPair]:
    """Random clean/corrupted pairs, reproducible from ``seed``.

    Args:
        n: Number of clean prompts (the result has ``2 n`` pairs when ``symmetric``).
        names: Names to draw from (filter with :func:`single_token_names` first).
        kinds: Corruption kinds, used in turn (pair ``i`` gets ``kinds[i % len(kinds)]``).
        templates: Template indices to draw from (default: all).
        places: Place fillers.
        objects: Object fillers.
        symmetric: Also add each pair reversed (corrupted as clean).
        seed: Random seed.
        template_strings: The templates.

    Returns:
        The pairs.
    """
    if len(names) < 4:
        raise ValueError(f"need at least 4 names, got {len(names)}")
    rng = random.Random(seed)
    templates = list(range(len(template_strings))) if templates is None else list(templates)
    out: list[IOIPair] = []
    for i in range(n):
        picked = rng.sample(list(names), 4)
        prefix = tuple(picked[:3])
        a = rng.randrange(3)
        clause = [prefix[j] for j in range(3) if j != a]
        if rng.random() < 0.5:
            clause.reverse()
        clean = IOIPrompt(rng.choice(templates), prefix, tuple(clause), rng.choice(list(places)),
                          rng.choice(list(objects)), template_strings)
        kind = kinds[i % len(kinds)]
        pair = IOIPair(clean, corrupt(clean, kind, new_name=picked[3]), kind)
        out.append(pair)
        if symmetric:
            out.append(pair.reversed())
    return out


@dataclass
class IOIBatch:
    """Tokenised pairs of equal length, ready for a model.

    Attributes:
        pairs: The pairs.
        clean_tokens: ``(N, T)``.
        corrupt_tokens: ``(N, T)``.
        clean_answer: ``(N,)`` token id of each clean answer.
        corrupt_answer: ``(N,)`` token id of each corrupted answer.
        positions: Token position ``(N,)`` of each name slot (``"P0" .. "R1"``) and of ``"END"``
            (the last token, where the answer is predicted); identical in clean and corrupted.
    """

    pairs: list[IOIPair]
    clean_tokens: torch.Tensor
    corrupt_tokens: torch.Tensor
    clean_answer: torch.Tensor
    corrupt_answer: torch.Tensor
    positions: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)


def tokenize_pairs(tokenizer: Any, pairs: Sequence[IOIPair]) -> list[IOIBatch]:
    """Tokenise pairs and group them into batches of equal token length.

    Args:
        tokenizer: A HF tokenizer with offsets (fast tokenizer) or a :class:`WordTokenizer`.
        pairs: From :func:`generate_pairs`; names must be single tokens under ``tokenizer``.

    Returns:
        One :class:`IOIBatch` per token length, longest group first.
    """
    groups: dict[int, list[tuple]] = {}
    for pair in pairs:
        ids_c, pos_c = _encode_prompt(tokenizer, pair.clean)
        ids_x, pos_x = _encode_prompt(tokenizer, pair.corrupt)
        if len(ids_c) != len(ids_x) or pos_c != pos_x:
            raise ValueError(f"clean and corrupted prompts tokenise differently: {pair.clean.text!r} / "
                             f"{pair.corrupt.text!r}; use single-token names")
        ans_c, ans_x = _encode(tokenizer, " " + pair.clean.answer), _encode(tokenizer, " " + pair.corrupt.answer)
        if len(ans_c) != 1 or len(ans_x) != 1:
            raise ValueError(f"answers must be single tokens: {pair.clean.answer!r}, {pair.corrupt.answer!r}")
        groups.setdefault(len(ids_c), []).append((pair, ids_c, ids_x, ans_c[0], ans_x[0], pos_c))
    batches = []
    for _, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        positions = {s: torch.tensor([r[5][s] for r in rows]) for s in (*SLOTS, "END")}
        batches.append(IOIBatch(
            pairs=[r[0] for r in rows],
            clean_tokens=torch.tensor([r[1] for r in rows]),
            corrupt_tokens=torch.tensor([r[2] for r in rows]),
            clean_answer=torch.tensor([r[3] for r in rows]),
            corrupt_answer=torch.tensor([r[4] for r in rows]),
            positions=positions,
        ))
    return batches


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _encode_prompt(tokenizer: Any, prompt: IOIPrompt) -> tuple[list[int], dict[str, int]]:
    text = prompt.text
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    positions = {}
    for slot, (s, e) in prompt.slot_spans().items():
        hits = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
        if len(hits) != 1:
            raise ValueError(f"name {text[s:e]!r} in slot {slot} spans {len(hits)} tokens; use single-token names")
        positions[slot] = hits[0]
    positions["END"] = len(ids) - 1
    return ids, positions


# ------------------------------------------------------------------------------------------ metrics
def logit_diff(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor, position: int = -1) -> torch.Tensor:
    """Per-example ``logit[correct] - logit[wrong]`` at ``position``.

    Args:
        logits: ``(N, T, vocab)`` (or ``(N, vocab)`` already at the position).
        correct: ``(N,)`` token ids.
        wrong: ``(N,)`` token ids.
        position: Sequence position (default: last).

    Returns:
        ``(N,)`` logit differences.
    """
    last = logits[:, position] if logits.dim() == 3 else logits
    return last.gather(1, correct[:, None]).squeeze(1) - last.gather(1, wrong[:, None]).squeeze(1)


def normalized_logit_diff(ld: torch.Tensor, ld_clean: torch.Tensor, ld_corrupt: torch.Tensor) -> torch.Tensor:
    """``(mean LD - mean LD_corrupt) / |mean LD_clean - mean LD_corrupt|``: 1 = clean, 0 = corrupted."""
    base = ld_corrupt.mean()
    return (ld.mean() - base) / (ld_clean.mean() - base).abs().clamp_min(1e-12)


def accuracy(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor | None = None,
             position: int = -1) -> torch.Tensor:
    """Fraction of examples solved.

    With ``wrong`` given: the correct answer's logit beats the corrupted answer's (``LD > 0``).
    Without: the correct answer is the arg-max over the whole vocabulary.
    """
    last = logits[:, position] if logits.dim() == 3 else logits
    if wrong is None:
        return (last.argmax(-1) == correct).float().mean()
    return (logit_diff(last, correct, wrong) > 0).float().mean()


class IOIMetric:
    """The normalised logit difference of a batch as a differentiable function of the logits.

    Computes the clean and corrupted baselines once; ``metric(logits)`` then returns NLD (1 for
    clean behaviour, 0 for corrupted), where the logit difference is always
    ``logit(clean answer) - logit(corrupted answer)``.

    Args:
        clean_logits: Logits of the clean prompts.
        corrupt_logits: Logits of the corrupted prompts.
        batch: The batch (for the answer ids).
    """

    def __init__(self, clean_logits: torch.Tensor, corrupt_logits: torch.Tensor, batch: IOIBatch):
        self.correct, self.wrong = batch.clean_answer, batch.corrupt_answer
        self.ld_clean = logit_diff(clean_logits.detach(), self.correct, self.wrong)
        self.ld_corrupt = logit_diff(corrupt_logits.detach(), self.correct, self.wrong)

    def ld(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example logit difference."""
        return logit_diff(logits, self.correct, self.wrong)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return normalized_logit_diff(self.ld(logits), self.ld_clean, self.ld_corrupt)


# ------------------------------------------------------------------------------------ word tokenizer
class WordTokenizer:
    """A word-level tokenizer over a fixed vocabulary (for models trained on the IOI templates).

    Tokens are words and punctuation marks; a token's offsets exclude surrounding spaces. The
    interface is the part of HF tokenizers this package uses (``encode``, ``__call__`` with
    ``return_offsets_mapping``, ``decode``).

    Args:
        words: The vocabulary (``"<unk>"`` is added as id 0).
    """

    _TOKEN = re.compile(r"\w+|[^\w\s]")
    unk_token_id = 0

    def __init__(self, words: Sequence[str]):
        self.vocab = ["<unk>"] + sorted(set(words) - {"<unk>"})
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def for_templates(cls, templates: Sequence[str] = TEMPLATES, names: Sequence[str] = NAMES,
                      places: Sequence[str] = PLACES, objects: Sequence[str] = OBJECTS) -> WordTokenizer:
        """The vocabulary of all prompts the templates can produce."""
        words = set(names) | set(places) | set(objects)
        for t in templates:
            words |= set(cls._TOKEN.findall(re.sub(r"\{\w+\}", " ", t)))
        return cls(sorted(words))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [self.ids.get(m.group(), 0) for m in self._TOKEN.finditer(text)]

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        matches = list(self._TOKEN.finditer(text))
        out: dict[str, list] = {"input_ids": [self.ids.get(m.group(), 0) for m in matches]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(m.start(), m.end()) for m in matches]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)
