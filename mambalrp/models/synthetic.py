"""Key-value retrieval over distractor text: a synthetic task with known evidence positions.

A sequence is a stream of random distractor tokens in which ``n_pairs`` pairs
``KEY k VALUE v`` (distinct keys, distinct values) are planted at random, non-overlapping
positions; it ends with the query ``KEY k ?`` asking for the value of one of the planted keys.
The correct answer is the value ``v`` planted right after that key, so the evidence is known
exactly: the value token of the queried pair (and, secondarily, its key token). The values of the
other pairs are plausible but wrong answers. Attribution methods can be scored on whether they
put the relevance on the evidence rather than on those distractors.

The vocabulary is word-level and fixed (see :func:`vocabulary`); :func:`build_tokenizer` returns
it as a ``tokenizers.Tokenizer`` so synthetic models load like the text models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

PAD, KEY, VALUE, QUERY = "<pad>", "KEY", "VALUE", "?"


@dataclass(frozen=True)
class TaskSpec:
    """Shape of the synthetic task.

    Attributes:
        seq_len: Total sequence length including the 3-token query.
        n_keys: Number of distinct key tokens ``k0 .. k{n_keys-1}``.
        n_values: Number of distinct value tokens ``v0 .. v{n_values-1}``; also the class count.
        n_distractors: Number of distractor tokens ``d0 .. d{n_distractors-1}``.
        n_pairs: Number of ``KEY k VALUE v`` pairs planted per sequence (one of them is queried).
    """

    seq_len: int = 32
    n_keys: int = 16
    n_values: int = 16
    n_distractors: int = 32
    n_pairs: int = 2

    def to_dict(self) -> dict[str, int]:
        """Return the spec as a plain dict (for JSON configs)."""
        return dict(self.__dict__)


@dataclass
class RetrievalExample:
    """One synthetic sequence with its answer and evidence.

    Attributes:
        input_ids: Token ids, length ``seq_len``.
        label: Index of the correct value (class id, ``0 .. n_values-1``).
        value_position: Position of the correct value token ``v``: the primary evidence.
        key_position: Position of the key token ``k`` of the queried pair.
        query_key_position: Position of the key token in the final query.
        distractor_value_positions: Positions of the values of the other, non-queried pairs.
        evidence_positions: ``(value_position, key_position)``.
    """

    input_ids: list[int]
    label: int
    value_position: int
    key_position: int
    query_key_position: int
    distractor_value_positions: list[int] = field(default_factory=list)

    @property
    def evidence_positions(self) -> tuple[int, int]:
        """Positions of the evidence tokens: the queried value first, then its key."""
        return (self.value_position, self.key_position)


def vocabulary(spec: TaskSpec) -> list[str]:
    """Return the token strings in id order.

    Args:
        spec: Task shape.

    Returns:
        ``[<pad>, KEY, VALUE, ?, k0.., v0.., d0..]``.
    """
    return (
        [PAD, KEY, VALUE, QUERY]
        + [f"k{i}" for i in range(spec.n_keys)]
        + [f"v{i}" for i in range(spec.n_values)]
        + [f"d{i}" for i in range(spec.n_distractors)]
    )


def value_token_id(spec: TaskSpec, value: int) -> int:
    """Token id of value ``v{value}``."""
    return 4 + spec.n_keys + value


def key_token_id(spec: TaskSpec, key: int) -> int:
    """Token id of key ``k{key}``."""
    return 4 + key


def build_tokenizer(spec: TaskSpec):
    """Return a word-level ``tokenizers.Tokenizer`` for the task vocabulary.

    Args:
        spec: Task shape.

    Returns:
        A tokenizer that splits on whitespace and maps each word to its id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(vocabulary(spec))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def make_example(spec: TaskSpec, rng: random.Random) -> RetrievalExample:
    """Draw one example.

    Args:
        spec: Task shape.
        rng: Source of randomness.

    Returns:
        The example.
    """
    body_len = spec.seq_len - 3
    slots = body_len - 4 * spec.n_pairs  # distractor tokens in the body
    if slots < 0 or spec.n_pairs > min(spec.n_keys, spec.n_values):
        raise ValueError("sequence too short or too many pairs for the spec")
    keys = rng.sample(range(spec.n_keys), spec.n_pairs)
    values = rng.sample(range(spec.n_values), spec.n_pairs)
    # Choose where each pair goes among the distractors: n_pairs sorted insertion points.
    cuts = sorted(rng.randrange(slots + 1) for _ in keys)
    order = list(range(spec.n_pairs))
    rng.shuffle(order)  # which pair sits in which slot
    queried = rng.randrange(spec.n_pairs)
    distract = [4 + spec.n_keys + spec.n_values + rng.randrange(spec.n_distractors) for _ in range(slots)]
    ids: list[int] = []
    positions: dict[int, tuple[int, int]] = {}
    prev = 0
    for slot, cut in enumerate(cuts):
        ids.extend(distract[prev:cut])
        prev = cut
        p = order[slot]
        start = len(ids)
        ids.extend([1, key_token_id(spec, keys[p]), 2, value_token_id(spec, values[p])])
        positions[p] = (start + 1, start + 3)
    ids.extend(distract[prev:])
    ids.extend([1, key_token_id(spec, keys[queried]), 3])
    key_pos, value_pos = positions[queried]
    others = sorted(positions[p][1] for p in positions if p != queried)
    return RetrievalExample(
        input_ids=ids,
        label=values[queried],
        value_position=value_pos,
        key_position=key_pos,
        query_key_position=spec.seq_len - 2,
        distractor_value_positions=others,
    )


def generate(spec: TaskSpec, n: int, seed: int) -> list[RetrievalExample]:
    """Draw ``n`` examples deterministically.

    Args:
        spec: Task shape.
        n: Number of examples.
        seed: Seed of the generator; the same seed gives the same examples.

    Returns:
        The examples.
    """
    rng = random.Random(seed)
    return [make_example(spec, rng) for _ in range(n)]


def to_tensors(examples: list[RetrievalExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into ``(input_ids, labels)`` long tensors.

    Args:
        examples: Examples of equal length.

    Returns:
        ``input_ids`` of shape ``(n, seq_len)`` and ``labels`` of shape ``(n,)``.
    """
    ids = torch.tensor([e.input_ids for e in examples], dtype=torch.long)
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return ids, labels
