"""Train the mambalrp model zoo on CPU, deterministically.

Usage::

    python -m benchmarks.zoo.train --all
    python -m benchmarks.zoo.train --tokenizer --lm-mamba1 --sst-mamba1
    python -m benchmarks.zoo.train --kv-mamba2

Every model is written to ``mambalrp/assets/zoo/<name>/`` (see :mod:`mambalrp.models.zoo` for the
file layout). Language models are intermediate products: the sentiment classifiers are fine-tuned
from them, so ``--sst-*`` needs the matching ``--lm-*`` output to exist (it is trained first
under ``--all``).

All randomness comes from fixed seeds, steps are counted (not timed) and torch runs on one
thread by default (``--threads``), so a rerun on the same software versions and thread count
reproduces the checkpoints. Mamba-1 training uses the parallel scan of ``mambapy`` through the
``use_mambapy`` switch of the Hugging Face mixer when that package is installed (the shipped
models were trained with it; same maths as the sequential loop up to float rounding, much faster
on CPU); the shipped configs have it off, so inference needs no extra package.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.zoo import data
from mambalrp.models import synthetic, zoo
from mambalrp.models.classifier import MambaSequenceClassifier
from mambalrp.models.zoo import build_backbone, save_model

EOS, PAD = "<|endoftext|>", "<|pad|>"

#: Output directory; ``--out`` changes it (for trial runs that must not touch the package).
OUT = zoo.ZOO_DIR
TOKENIZER_VOCAB = 4096

#: Architecture shared by the text models.
TEXT_ARCH = {
    "mamba": dict(hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4,
        head_dim=16, num_heads=8, n_groups=1, chunk_size=32,
    ),
}

#: Language-model training (next-token prediction on full reviews + training sentences).
LM_CONFIG = {
    "mamba": dict(seq_len=64, batch_size=16, steps=500, lr=3e-3, warmup=40, weight_decay=0.01, seed=0),
    "mamba2": dict(seq_len=64, batch_size=16, steps=800, lr=3e-3, warmup=50, weight_decay=0.01, seed=0),
}

#: Sentiment fine-tuning from the language model.
SST_CONFIG = {
    "mamba": dict(max_length=64, batch_size=32, epochs=6, lr=1e-3, weight_decay=0.05, replicate=1.0, seed=0),
    "mamba2": dict(max_length=64, batch_size=32, epochs=6, lr=1e-3, weight_decay=0.05, replicate=1.0, seed=0),
}

#: Synthetic key-value retrieval, trained from scratch on freshly generated batches.
#: ``kv-*``: two planted pairs, so the model must bind the queried key to its value.
#: ``kv1-mamba1``: one planted pair (the task as simple as it gets; learned to 100% quickly).
KV_SPECS = {
    "kv-mamba1": synthetic.TaskSpec(seq_len=32, n_keys=16, n_values=16, n_distractors=32, n_pairs=2),
    "kv-mamba2": synthetic.TaskSpec(seq_len=32, n_keys=16, n_values=16, n_distractors=32, n_pairs=2),
    "kv1-mamba1": synthetic.TaskSpec(seq_len=32, n_keys=16, n_values=16, n_distractors=32, n_pairs=1),
}
KV_ARCH = {
    "mamba": dict(hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4,
        head_dim=16, num_heads=8, n_groups=1, chunk_size=32,
    ),
}
#: Mamba-1 with two pairs sits near 50% (it finds the planted values but not which one belongs to
#: the queried key) for roughly 700 steps before it learns the binding, hence the longer run.
KV_CONFIG = {
    "kv-mamba1": dict(batch_size=32, steps=1200, lr=3e-3, warmup=60, weight_decay=0.0, seed=0,
                      test_seed=10_000, n_test=2000),
    "kv-mamba2": dict(batch_size=64, steps=1000, lr=3e-3, warmup=100, weight_decay=0.0, seed=0,
                      test_seed=10_000, n_test=2000),
    "kv1-mamba1": dict(batch_size=32, steps=500, lr=3e-3, warmup=50, weight_decay=0.0, seed=0,
                       test_seed=10_000, n_test=2000),
}


# ----------------------------------------------------------------------------------------------
# helpers


#: Intra-op threads. One thread is the default: on a shared two-core machine it was several times
#: faster than two, and a fixed count keeps reruns bit-identical.
THREADS = 1


def setup(seed: int) -> None:
    """Seed every generator and pin torch's thread count.

    ``torch.use_deterministic_algorithms(True)`` is deliberately not switched on: on CPU it made
    masked Mamba training steps about ten times slower, and the CPU kernels used here (dense
    matmuls, convolutions, elementwise ops) already give identical results for a fixed thread
    count, which is what makes reruns reproducible.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(THREADS)


def versions() -> dict[str, str]:
    """Versions of the software that produced a checkpoint."""
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms, biases, A_log, D, dt)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "A_log" not in name else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )


def fast_scan(model: nn.Module, on: bool) -> None:
    """Toggle the parallel-scan path of HF Mamba-1 mixers (needs ``mambapy``; same math)."""
    for module in model.modules():
        if hasattr(module, "use_mambapy"):
            module.use_mambapy = on


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def tag(arch: str) -> str:
    """Name suffix of an architecture: ``mamba -> mamba1``, ``mamba2 -> mamba2``."""
    return {"mamba": "mamba1", "mamba2": "mamba2"}[arch]


def lm_dir(arch: str) -> Path:
    """Directory of the language model of an architecture."""
    return OUT / f"lm-{tag(arch)}"


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer() -> dict:
    """Train a byte-level BPE (4,096 tokens) on the training reviews and training sentences."""
    out = OUT / "tokenizer"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    reviews = data.review_splits()["train"]
    sentences = data.sentence_splits()["train"]
    texts = [e.text for e in reviews] + [e.text for e in sentences]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    lengths = [len(tok.encode(e.text).ids) for e in sentences]
    info = {"vocab_size": tok.get_vocab_size(), "sentence_tokens_mean": float(np.mean(lengths)),
            "sentence_tokens_max": int(max(lengths)),
            "sentence_tokens_p99": float(np.percentile(lengths, 99))}
    print("tokenizer", info, flush=True)
    return info


def load_tokenizer():
    """Load the BPE tokenizer written by :func:`train_tokenizer`."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(OUT / "tokenizer" / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# language models


def lm_tokens(tok, examples) -> list[int]:
    """Concatenate the token ids of the texts, each followed by ``<|endoftext|>``."""
    eos = tok.token_to_id(EOS)
    out: list[int] = []
    for e in examples:
        out.extend(tok.encode(e.text).ids)
        out.append(eos)
    return out


def train_lm(arch: str) -> dict:
    """Train a Mamba/Mamba-2 causal LM; report validation perplexity against a unigram baseline."""
    from transformers import Mamba2ForCausalLM, MambaForCausalLM

    cfg = LM_CONFIG[arch]
    setup(cfg["seed"])
    tok = load_tokenizer()
    reviews = data.review_splits()
    train_ids = lm_tokens(tok, reviews["train"]) + lm_tokens(tok, data.sentence_splits()["train"])
    valid_ids = lm_tokens(tok, reviews["valid"])
    vocab = tok.get_vocab_size()
    config = build_backbone(arch, vocab_size=vocab, pad_token_id=tok.token_to_id(PAD),
                            eos_token_id=tok.token_to_id(EOS), **TEXT_ARCH[arch]).config
    config.tie_word_embeddings = True
    model = (MambaForCausalLM if arch == "mamba" else Mamba2ForCausalLM)(config)
    fast_scan(model, True)
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    L, B = cfg["seq_len"], cfg["batch_size"]
    data_t = torch.tensor(train_ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg["seed"])
    model.train()
    t0 = time.time()
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        starts = torch.randint(0, len(data_t) - L, (B,), generator=gen)
        x = torch.stack([data_t[s:s + L] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg["steps"] - 1:
            print(f"lm-{tag(arch)} step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    seconds = time.time() - t0
    model.eval()

    # Validation: non-overlapping windows of seq_len; each predicts tokens 1..L-1 from its prefix.
    v = torch.tensor(valid_ids[: (len(valid_ids) // L) * L]).view(-1, L)
    counts = Counter(train_ids)
    total = len(train_ids)
    nll, n, uni = 0.0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(v), 64):
            x = v[i:i + 64]
            logits = model(input_ids=x, use_cache=False).logits[:, :-1]
            target = x[:, 1:]
            nll += nn.functional.cross_entropy(
                logits.reshape(-1, vocab), target.reshape(-1), reduction="sum"
            ).item()
            n += target.numel()
            for t in target.reshape(-1).tolist():
                uni -= math.log((counts.get(t, 0) + 1) / (total + vocab))
    metrics = {
        "valid_perplexity": math.exp(nll / n),
        "unigram_perplexity": math.exp(uni / n),
        "valid_tokens": n,
        "train_tokens": len(train_ids),
        "train_seconds": seconds,
        "seed": cfg["seed"],
        "versions": versions(),
    }
    print(f"lm-{tag(arch)}", json.dumps(metrics), flush=True)
    save_model(
        lm_dir(arch), model, tok,
        info={"name": f"lm-{tag(arch)}", "architecture": arch, "task": "causal-lm",
              "class": type(model).__name__},
        training={**cfg, "arch": TEXT_ARCH[arch],
                  "data": "Pang & Lee polarity v2.0 reviews (1,400 train) + sentence-polarity train split, "
                          "no labels"},
        metrics=metrics,
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# sentiment classifiers


def evaluate(model: nn.Module, batches) -> float:
    """Accuracy of a classifier over ``(input_ids, attention_mask, labels)`` batches."""
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for ids, mask, y in batches:
            correct += (model(ids, attention_mask=mask).argmax(-1) == y).sum().item()
            n += len(y)
    return correct / n


def text_batches(tok, examples, max_length: int, batch_size: int, order: list[int] | None = None):
    """Yield left-padded ``(input_ids, attention_mask, labels)`` batches, truncating to ``max_length``."""
    pad = tok.token_to_id(PAD)
    order = order if order is not None else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i:i + batch_size]]
        ids, mask = left_pad([tok.encode(e.text).ids[:max_length] for e in chunk], pad)
        yield ids, mask, torch.tensor([e.label for e in chunk])


def sentence_loss(model: MambaSequenceClassifier, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor,
                  replicate: float) -> torch.Tensor:
    """Cross-entropy at the last token, plus ``replicate`` times the mean over all real prefixes.

    The second term ("target replication") asks every prefix of the sentence to lean towards the
    sentence's label. It supervises the recurrent state at every step, which regularises the
    last-token classifier on a small training set; at inference only the last token is read.
    """
    hidden = model.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    logits = model.head(hidden)
    loss = nn.functional.cross_entropy(logits[:, -1], y)  # batches are left-padded
    if replicate:
        per_token = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y[:, None].expand_as(mask).reshape(-1), reduction="none"
        )
        weight = mask.reshape(-1).float()
        loss = loss + replicate * (per_token * weight).sum() / weight.sum()
    return loss


def train_sst(arch: str, **overrides) -> dict:
    """Fine-tune a sentiment classifier from the arch's LM on the sentence-polarity train split."""
    from mambalrp.models.zoo import load_model

    cfg = {**SST_CONFIG[arch], **overrides}
    setup(cfg["seed"])
    lm, tok = load_model(f"lm-{tag(arch)}", directory=OUT)
    model = MambaSequenceClassifier(lm.backbone, num_labels=2)
    if cfg.get("freeze_embeddings"):
        # The pretrained token embeddings hold most parameters; keeping them fixed curbs
        # over-fitting on the 2,880 training sentences.
        model.backbone.get_input_embeddings().weight.requires_grad_(False)
    fast_scan(model, True)
    splits = data.sentence_splits()
    if cfg.get("limit"):
        splits = {k: v[: cfg["limit"]] for k, v in splits.items()}
    t0 = time.time()
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    steps_per_epoch = math.ceil(len(splits["train"]) / cfg["batch_size"])
    total = steps_per_epoch * cfg["epochs"]
    rng = random.Random(cfg["seed"])
    valid = list(text_batches(tok, splits["valid"], cfg["max_length"], 64))
    best, best_state, history, step = -1.0, None, [], 0
    for epoch in range(cfg["epochs"]):
        order = list(range(len(splits["train"])))
        rng.shuffle(order)
        model.train()
        for ids, mask, y in text_batches(tok, splits["train"], cfg["max_length"], cfg["batch_size"], order):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg["lr"], steps_per_epoch // 2)
            loss = sentence_loss(model, ids, mask, y, cfg.get("replicate", 0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        acc = evaluate(model, valid)
        history.append({"epoch": epoch + 1, "valid_accuracy": acc, "last_loss": loss.item(),
                        "seconds": time.time() - t0})
        print(f"sst-{tag(arch)}", history[-1], flush=True)
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    seconds = time.time() - t0
    model.load_state_dict(best_state)
    fast_scan(model, False)  # the test accuracy is measured on the path the shipped model uses
    test_acc = evaluate(model, text_batches(tok, splits["test"], cfg["max_length"], 64))
    metrics = {
        "test_accuracy": test_acc,
        "test_examples": len(splits["test"]),
        "valid_accuracy": best,
        "best_epoch": max(history, key=lambda h: h["valid_accuracy"])["epoch"],
        "history": history,
        "train_seconds": seconds,
        "lm_train_seconds": json.loads((lm_dir(arch) / "metrics.json").read_text())["train_seconds"],
        "seed": cfg["seed"],
        "versions": versions(),
    }
    print(f"sst-{tag(arch)}", json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)
    save_model(
        OUT / f"sst-{tag(arch)}", model, tok,
        info={"name": f"sst-{tag(arch)}", "architecture": arch, "task": "sentiment",
              "class": "MambaSequenceClassifier", "num_labels": 2, "labels": ["negative", "positive"],
              "max_length": cfg["max_length"], "padding_side": "left", "pad_token": PAD},
        training={**cfg, "arch": TEXT_ARCH[arch], "init": f"lm-{tag(arch)}",
                  "data": "Pang & Lee sentence polarity v1.0, fixed split "
                          "(benchmarks.zoo.data.split_indices)",
                  "split": {"seed": data.SPLIT_SEED, "train": len(splits["train"]),
                            "valid": len(splits["valid"]), "test": len(splits["test"])}},
        metrics=metrics,
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# synthetic key-value retrieval


def train_kv(name: str) -> dict:
    """Train a key-value retrieval classifier (``kv-mamba1``, ``kv-mamba2``, ``kv1-mamba1``)."""
    arch = "mamba2" if name.endswith("mamba2") else "mamba"
    cfg = KV_CONFIG[name]
    spec = KV_SPECS[name]
    setup(cfg["seed"])
    tok = synthetic.build_tokenizer(spec)
    backbone = build_backbone(arch, vocab_size=len(synthetic.vocabulary(spec)), pad_token_id=0,
                              eos_token_id=0, **KV_ARCH[arch])
    model = MambaSequenceClassifier(backbone, num_labels=spec.n_values)
    fast_scan(model, True)
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"])
    rng = random.Random(cfg["seed"])
    test_ids, test_y = synthetic.to_tensors(synthetic.generate(spec, cfg["n_test"], cfg["test_seed"]))
    t0 = time.time()
    history = []
    for step in range(cfg["steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"])
        ids, y = synthetic.to_tensors([synthetic.make_example(spec, rng) for _ in range(cfg["batch_size"])])
        model.train()
        loss = nn.functional.cross_entropy(model(ids), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(test_ids[:500]).argmax(-1) == test_y[:500]).float().mean().item()
            history.append({"step": step, "loss": loss.item(), "acc500": acc, "seconds": time.time() - t0})
            print(name, history[-1], flush=True)
    seconds = time.time() - t0
    fast_scan(model, False)
    model.eval()
    with torch.no_grad():
        test_acc = (model(test_ids).argmax(-1) == test_y).float().mean().item()
    metrics = {
        "test_accuracy": test_acc,
        "test_examples": cfg["n_test"],
        "chance_accuracy": 1 / spec.n_values,
        "history": history,
        "train_seconds": seconds,
        "seed": cfg["seed"],
        "versions": versions(),
    }
    print(name, json.dumps({k: v for k, v in metrics.items() if k != "history"}), flush=True)
    save_model(
        OUT / name, model, tok,
        info={"name": name, "architecture": arch, "task": "kv-retrieval",
              "class": "MambaSequenceClassifier", "num_labels": spec.n_values,
              "labels": [f"v{i}" for i in range(spec.n_values)], "task_spec": spec.to_dict(),
              "padding_side": "left", "pad_token": synthetic.PAD},
        training={**cfg, "arch": KV_ARCH[arch], "task_spec": spec.to_dict(),
                  "data": "mambalrp.models.synthetic.make_example, fresh batch per step"},
        metrics=metrics,
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    global OUT, THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    jobs = ["tokenizer", "lm-mamba1", "lm-mamba2", "sst-mamba1", "sst-mamba2", *KV_CONFIG]
    parser.add_argument("--all", action="store_true", help="train everything, in dependency order")
    for job in jobs:
        parser.add_argument(f"--{job}", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the package zoo)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="tiny step counts, for checking the script")
    args = parser.parse_args(argv)
    THREADS = args.threads
    if args.out is not None:
        OUT = args.out
    if args.smoke:
        for table in (LM_CONFIG, KV_CONFIG):
            for cfg in table.values():
                cfg["steps"], cfg["warmup"] = 3, 1
        for cfg in SST_CONFIG.values():
            cfg["epochs"], cfg["limit"] = 1, 64
        for cfg in KV_CONFIG.values():
            cfg["n_test"] = 200
    chosen = [j for j in jobs if args.all or getattr(args, j.replace("-", "_"))]
    if not chosen:
        parser.error("choose --all or at least one model flag")
    arch = {"mamba1": "mamba", "mamba2": "mamba2"}
    for job in chosen:
        if job == "tokenizer":
            train_tokenizer()
            continue
        if job in KV_CONFIG:
            train_kv(job)
            continue
        kind, a = job.split("-")
        {"lm": train_lm, "sst": train_sst}[kind](arch[a])


if __name__ == "__main__":
    main()
