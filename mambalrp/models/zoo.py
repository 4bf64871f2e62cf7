"""Small pretrained Mamba / Mamba-2 models shipped with mambalrp.

Each model lives in ``mambalrp/assets/zoo/<name>/``:

* ``model.json``: what the model is (architecture, task, labels, padding side);
* ``config.json``: the Hugging Face backbone configuration;
* ``model.safetensors``: the weights (fp32);
* ``tokenizer.json``: a ``tokenizers.Tokenizer`` (left padding enabled for classifiers);
* ``training.json`` and ``metrics.json``: how it was trained and how well it does.

Models (see ``docs/zoo.md``):

* ``sst-mamba1``, ``sst-mamba2``: sentence-polarity classifiers (negative / positive);
* ``kv-mamba1``, ``kv-mamba2``: key-value retrieval over distractors with two planted pairs,
  ``kv1-mamba1``: the same with one pair (:mod:`mambalrp.models.synthetic`; known evidence
  positions; the task shape is in ``model_info(name)["task_spec"]``);
* ``lm-mamba1``, ``lm-mamba2``: the small causal language models the classifiers start from.

Example:
    >>> import torch
    >>> from mambalrp.models.zoo import load_model
    >>> model, tok = load_model("sst-mamba1")
    >>> enc = tok.encode_batch(["a gorgeous , witty film .", "dull ."])
    >>> ids = torch.tensor([e.ids for e in enc]); mask = torch.tensor([e.attention_mask for e in enc])
    >>> model(ids, attention_mask=mask).argmax(-1)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mambalrp.models.classifier import MambaSequenceClassifier

ZOO_DIR = Path(__file__).resolve().parent.parent / "assets" / "zoo"


def build_backbone(arch: str, **config: Any) -> nn.Module:
    """Create a randomly initialised Hugging Face backbone.

    Args:
        arch: ``"mamba"`` (``MambaModel``) or ``"mamba2"`` (``Mamba2Model``).
        **config: Fields of ``MambaConfig`` / ``Mamba2Config``.

    Returns:
        The backbone module.
    """
    from transformers import Mamba2Config, Mamba2Model, MambaConfig, MambaModel

    if arch == "mamba":
        return MambaModel(MambaConfig(**config))
    if arch == "mamba2":
        return Mamba2Model(Mamba2Config(**config))
    raise ValueError(f"unknown architecture {arch!r}")


def available_models(directory: Path | str | None = None) -> list[str]:
    """Return the names of the models present in the zoo directory.

    Args:
        directory: Zoo directory; defaults to the package's ``assets/zoo``.

    Returns:
        Sorted model names.
    """
    root = Path(directory) if directory is not None else ZOO_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "model.json").is_file())


def model_info(name: str, directory: Path | str | None = None) -> dict[str, Any]:
    """Return a model's description merged with its metrics and training configuration.

    Args:
        name: Model name (see :func:`available_models`).
        directory: Zoo directory; defaults to the package's ``assets/zoo``.

    Returns:
        ``model.json`` content with ``"metrics"`` and ``"training"`` entries added.
    """
    path = _model_dir(name, directory)
    info = json.loads((path / "model.json").read_text())
    for extra in ("metrics", "training"):
        file = path / f"{extra}.json"
        if file.is_file():
            info[extra] = json.loads(file.read_text())
    return info


def _model_dir(name: str, directory: Path | str | None) -> Path:
    root = Path(directory) if directory is not None else ZOO_DIR
    path = root / name
    if not (path / "model.json").is_file():
        raise KeyError(f"no zoo model {name!r} in {root}; available: {available_models(root)}")
    return path


def load_model(name: str, directory: Path | str | None = None, dtype: torch.dtype = torch.float32):
    """Load a zoo model and its tokenizer.

    Args:
        name: Model name (see :func:`available_models`).
        directory: Zoo directory; defaults to the package's ``assets/zoo``.
        dtype: Parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode (a :class:`MambaSequenceClassifier` for
        classification models, ``MambaForCausalLM`` / ``Mamba2ForCausalLM`` for language models)
        and a ``tokenizers.Tokenizer``.
    """
    from safetensors.torch import load_model as load_weights
    from tokenizers import Tokenizer
    from transformers import (
        Mamba2Config,
        Mamba2ForCausalLM,
        Mamba2Model,
        MambaConfig,
        MambaForCausalLM,
        MambaModel,
    )

    path = _model_dir(name, directory)
    info = json.loads((path / "model.json").read_text())
    config_dict = json.loads((path / "config.json").read_text())
    if info["architecture"] == "mamba":
        config, backbone_cls, lm_cls = MambaConfig.from_dict(config_dict), MambaModel, MambaForCausalLM
    else:
        config, backbone_cls, lm_cls = Mamba2Config.from_dict(config_dict), Mamba2Model, Mamba2ForCausalLM
    if info["task"] == "causal-lm":
        model: nn.Module = lm_cls(config)
    else:
        model = MambaSequenceClassifier(backbone_cls(config), num_labels=info["num_labels"])
    load_weights(model, str(path / "model.safetensors"), strict=True)
    model.to(dtype).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    return model, tokenizer


def save_model(
    path: Path | str,
    model: nn.Module,
    tokenizer,
    info: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
) -> None:
    """Write a model in the zoo layout (used by the training script).

    Args:
        path: Target directory (created).
        model: A :class:`MambaSequenceClassifier` or an HF causal LM.
        tokenizer: A ``tokenizers.Tokenizer``; left padding is enabled for classifiers.
        info: Content of ``model.json`` (needs ``architecture``, ``task`` and, for classifiers,
            ``num_labels``).
        training: Content of ``training.json``.
        metrics: Content of ``metrics.json``.
    """
    from safetensors.torch import save_model as save_weights

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "use_mambapy"):
        config.use_mambapy = False
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    save_weights(model.float(), str(path / "model.safetensors"))
    if info.get("task") != "causal-lm" and "pad_token" in info:
        pad = info["pad_token"]
        tokenizer.enable_padding(direction="left", pad_id=tokenizer.token_to_id(pad), pad_token=pad)
        if "max_length" in info:
            tokenizer.enable_truncation(max_length=info["max_length"])
    tokenizer.save(str(path / "tokenizer.json"))
    for file, content in (("model.json", info), ("training.json", training), ("metrics.json", metrics)):
        (path / file).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
