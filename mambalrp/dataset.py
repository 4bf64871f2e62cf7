"""``explain_dataset()``: explain every text of a corpus on Ray Data, one output row per example.

Example::

    import mambalrp
    out = mambalrp.explain_dataset("sst-mamba1", "texts.jsonl", text_column="text", output="relevance/")
    out.to_pandas()                       # one row per example: tokens, relevance, logit, ...

How it runs (docs/datasets.md):

1. The driver reads the input into an Arrow table, numbers the rows (``row_id``), sorts them by
   text length and cuts them into shards of ``shard_size`` rows; the ids are fixed before any work
   is distributed.
2. Ray Data sends one shard per call to a pool of actors (``ActorPoolStrategy``); each actor loads
   the model once (from a loader callable, a zoo name or a local checkpoint, never a pickled
   model), on a GPU of its own when the cluster has GPUs, and explains the shard in length-bucketed,
   left-padded batches (:func:`mambalrp.dataset_rows.explain_table`).
3. With ``output=``, each actor writes its shard to ``output/part-<first id>-<digest of the ids>.parquet``
   through a temporary file and an atomic rename, so a retried shard rewrites the same file: an
   actor killed mid-shard is restarted by Ray and its shard rerun, and no row is lost or written
   twice. A rerun into the same ``output`` skips the rows already written (resume).

Ray is imported only when :func:`explain_dataset` runs; without it the call raises an
``ImportError`` naming the ``mambalrp[ray]`` extra.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mambalrp.dataset_rows import OUTPUT_COLUMNS, Method, RowOptions
from mambalrp.rules import RuleSet

__all__ = ["OUTPUT_COLUMNS", "explain_dataset", "read_data"]

#: Shards hold this many batches by default.
BATCHES_PER_SHARD = 4
#: Written into ``output/`` to check that a resumed run continues the same job.
MANIFEST = "_mambalrp_manifest.json"
_PART_PREFIX = "part-"
_TMP_PREFIX = ".tmp-"

ModelSpec = Any  # a zero-argument loader callable, a zoo name, or a checkpoint path


def _import_ray():
    try:
        import pyarrow  # noqa: F401
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "explain_dataset runs on Ray Data, which is not installed: pip install 'mambalrp[ray]' "
            f"(ray[data], pyarrow, pandas) ({err})"
        ) from err
    return ray


def explain_dataset(
    model: ModelSpec,
    data: Any,
    *,
    text_column: str = "text",
    target: int | str | None = None,
    tokenizer: Any = None,
    labels: Sequence[str] | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    on_error: str = "record",
    rules: str | RuleSet = "mambalrp",
    recompute: bool | float | str = "auto",
    verify: bool = True,
    method: Method | None = None,
    method_name: str | None = None,
    output: str | os.PathLike | None = None,
    resume: bool = True,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    shard_size: int | None = None,
    address: str | None = None,
    progress: bool | Callable[[dict[str, Any]], None] | None = None,
):
    """Explain the prediction (or a given target) for every text of a dataset, on Ray Data.

    Ray is started locally (all of this machine's CPUs and GPUs) unless it is already running
    (``ray.init(address=...)`` before the call, or ``address=``). Each worker is a Ray actor that
    loads the model once and explains shard after shard; with GPUs in the cluster each worker
    takes one (one model per GPU).

    Args:
        model: How each worker gets the model: a zero-argument callable returning ``(model,
            tokenizer)`` (or a model, with ``tokenizer=``), a zoo name (``"sst-mamba1"``, see
            :mod:`mambalrp.models.zoo`) or a local checkpoint directory (:func:`mambalrp.loading.load`).
            A model object is refused: models are loaded by the workers, never pickled.
        data: A list of texts, a list of dicts, a ``pandas.DataFrame``, a ``pyarrow.Table``, a
            Hugging Face ``datasets.Dataset``, a Ray ``Dataset``, or a path to a ``.jsonl``,
            ``.json``, ``.csv``, ``.parquet`` or ``.txt`` file (one text per line).
        text_column: Column holding the texts (a list of texts becomes this column).
        target: What to explain: ``None`` for the model's prediction (arg-max class, or next
            token of a language model), an ``int`` class / token id, a label name (``"positive"``,
            from ``labels`` or the model's config; a token string for language models), or the name
            of a column holding one target per row (ids or label names). A name that is both a
            column and a label is the column.
        tokenizer: The tokenizer, when the loader returns the model alone.
        labels: Class names (index = class id); defaults to the zoo's labels or the model's
            ``config.id2label``.
        batch_size: Rows per forward / backward pass (rows of similar lengths are batched, left
            padding with an attention mask).
        max_length: Most tokens per row; default: the tokenizer's own limit, if it has one.
        on_error: ``"record"`` (default): a bad row gets a message in ``error`` (empty text,
            undecodable bytes, over ``max_length``, a failure while explaining it);
            ``"truncate"``: likewise, except that rows over ``max_length`` keep their first
            ``max_length`` tokens and ``truncated_from`` records their length; ``"raise"``: the
            first bad row fails the job.
        rules: Rule set (``"mambalrp"``, ``"gradient"``, ``"ln-only"``, or a :class:`~mambalrp.rules.RuleSet`).
        recompute: Per-layer recomputation for long inputs (see :func:`mambalrp.explain`);
            ``"auto"`` (default) recomputes batches of at least 4,096 tokens.
        verify: Verify the model under the rules in each worker (cached after its first batch).
        method: Instead of :func:`mambalrp.explain`, an attribution method ``(model, ids, target)
            -> (batch, T)`` scores (the faithfulness suite's methods), called on unpadded rows of
            one length; ``logit``, ``conservation_delta`` and ``verified`` are then null.
        method_name: What the ``rules`` column records for ``method`` (default: its ``__name__``).
        output: Directory for the results, one Parquet file per shard, plus a manifest. Given,
            the call runs the job to completion and returns a dataset reading those files; a rerun
            with the same data and settings skips the rows already written. Without it, the
            returned dataset is lazy: it is computed when written or iterated (and again each time:
            ``.materialize()`` it to keep it).
        resume: With an ``output`` that already holds shards: continue the job (default), or,
            if ``False``, refuse.
        workers: Number of actors (default: the cluster's GPUs if it has any, else its CPUs,
            at most one per shard).
        gpus_per_worker: GPUs per actor (default: 1 when the cluster has GPUs, else 0).
        shard_size: Rows per shard, the unit of distribution, retry and resume (default:
            ``4 * batch_size``).
        address: Address of a running Ray cluster, used when Ray is not yet initialised.
        progress: ``True`` prints shard progress to stderr (default: when stderr is a terminal),
            ``False`` keeps quiet, a callable receives each finished shard's summary (``rows``,
            ``errors``, ``seconds``, ``worker_pid``, ``peak_rss_mb``, ``file``); only with ``output``.

    Returns:
        A Ray ``Dataset``: the input columns, then the columns of :data:`OUTPUT_COLUMNS`
        (docs/datasets.md has the schema), one row per input row, in shard order (sort by
        ``row_id`` for the input order).

    Raises:
        ImportError: Ray is not installed (``pip install 'mambalrp[ray]'``).
        InputError: Bad options, a missing column, an output directory holding another job, or a
            model object instead of a way to load one (all before Ray starts).
        UnsupportedModelError: The workers' model cannot be explained (raised through Ray).
        VerificationError: The workers' model fails verification (raised through Ray).
    """
    from mambalrp.errors import InputError

    ray = _import_ray()
    import pyarrow as pa

    spec = _model_spec(model)
    options = RowOptions(
        text_column=text_column,
        target=target,
        labels=tuple(labels) if labels is not None else _zoo_labels(spec),
        batch_size=batch_size,
        max_length=max_length,
        on_error=on_error,
        rules=rules,
        recompute=recompute,
        verify=verify,
        method=method,
        method_name=method_name,
    )
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise InputError(f"shard_size must be a positive int; got {shard_size!r}")
    shard_size = shard_size or BATCHES_PER_SHARD * batch_size
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise InputError(f"workers must be a positive int; got {workers!r}")
    table = _as_table(data, text_column, ray)
    if text_column not in table.column_names:
        raise InputError(f"no text column {text_column!r} in the data; columns: {table.column_names}")
    clash = [c for c in OUTPUT_COLUMNS if c in table.column_names]
    if clash:
        raise InputError(f"input columns {clash} have the names of output columns; rename them")
    column = options.target_column(table.column_names)
    if column is None and isinstance(target, str) and options.labels is not None and target not in options.labels:
        raise InputError(f"target {target!r} is neither a column of the data nor one of the labels {list(options.labels)}")
    if table.num_rows == 0:
        raise InputError("the data has no rows")
    table = table.append_column("row_id", pa.array(range(table.num_rows), pa.int64()))

    done: set[int] = set()
    out_dir = Path(output) if output is not None else None
    if out_dir is not None:
        done = _prepare_output(out_dir, _manifest(spec, options, table, shard_size), resume)
    shards = _shards(table, text_column, shard_size, done)

    show = sys.stderr.isatty() if progress is None else progress
    if not ray.is_initialized():  # after the checks above: bad input fails without starting Ray
        if address is None:  # a local Ray for this process: no dashboard to start
            ray.init(include_dashboard=False, logging_level="WARNING")
        else:
            ray.init(address=address, logging_level="WARNING")
    if not shards:  # everything was written by an earlier run
        return _read_output(ray, out_dir)
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    per_gpu = (1.0 if gpus else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
    if workers is None:
        workers = max(1, int(gpus // per_gpu) if per_gpu else int(resources.get("CPU", 1.0)))
    workers = min(workers, len(shards))

    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    if out_dir is not None:  # ours instead, per shard (datasets copy the context when created)
        context.enable_progress_bars = False
    try:
        items = ray.data.from_items(
            [{"shard": k, "payload": _ipc(part)} for k, part in enumerate(shards)], override_num_blocks=len(shards)
        )
        mapped = items.map_batches(
            _Worker,
            fn_constructor_kwargs={"spec": spec, "tokenizer": tokenizer, "options": options,
                                   "output": None if out_dir is None else str(out_dir)},
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=per_gpu,
            # Ray Data's actor pools restart a dead actor and retry its shard without limit
            # (max_restarts=-1, max_task_retries=-1 are its defaults); shard files make the retry
            # idempotent.
        )
        if out_dir is None:
            return mapped
        report = _Progress(show, table.num_rows, len(done))
        try:
            for summary in mapped.iter_rows():
                report(dict(summary))
        finally:
            report.close()
    finally:
        context.enable_progress_bars = bars
    return _read_output(ray, out_dir)


class _Worker:
    """A Ray actor: the model loaded once, then one shard per call."""

    def __init__(self, spec: ModelSpec, tokenizer: Any, options: RowOptions, output: str | None) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        import torch

        model, tok = _load(spec, tokenizer)
        if torch.cuda.is_available():  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            model = model.to("cuda")
        self.model, self.tokenizer, self.options, self.output = model, tok, options, output

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa

        from mambalrp.dataset_rows import explain_table

        tables = []
        summaries = []
        for payload in batch["payload"]:
            start = time.perf_counter()
            shard = pa.ipc.open_stream(pa.py_buffer(bytes(payload))).read_all()
            result = explain_table(self.model, self.tokenizer, shard, self.options)
            if self.output is None:
                tables.append(result)
                continue
            file = _write_shard(Path(self.output), result)
            summaries.append({
                "file": file.name,
                "rows": result.num_rows,
                "errors": result.num_rows - result.column("error").null_count,
                "seconds": time.perf_counter() - start,
                "worker_pid": os.getpid(),
                "peak_rss_mb": _peak_rss_mb(),
            })
        if self.output is None:
            return pa.concat_tables(tables)
        return pa.Table.from_pylist(summaries)


def _load(spec: ModelSpec, tokenizer: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a loader callable, a zoo name or a checkpoint path."""
    from torch import nn

    from mambalrp.errors import InputError

    if callable(spec):
        loaded = spec()
    else:  # a zoo name or a checkpoint directory
        from mambalrp.loading import load

        loaded = load(str(spec))
    if isinstance(loaded, tuple) and len(loaded) == 2:
        model, tok = loaded
        tok = tokenizer if tokenizer is not None else tok
    else:
        model, tok = loaded, tokenizer
    if not isinstance(model, nn.Module):
        raise InputError(f"the model loader returned a {type(model).__name__}, not a torch.nn.Module")
    return model, tok


def _model_spec(model: Any) -> ModelSpec:
    from torch import nn

    from mambalrp.errors import InputError

    if isinstance(model, nn.Module):
        raise InputError(
            "explain_dataset loads the model in each worker: pass a zero-argument loader callable, a zoo "
            "name or a checkpoint path, not a model object (a model is never pickled to the workers)"
        )
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if isinstance(model, str):
        if not os.path.exists(model) and not _zoo_has(model):
            from mambalrp.models.zoo import available_models

            raise InputError(f"{model!r} is neither a zoo model ({', '.join(available_models())}) nor an existing path")
        return model
    if callable(model):
        return model
    raise InputError(f"model must be a loader callable, a zoo name or a checkpoint path; got {type(model).__name__}")


def _zoo_has(name: str) -> bool:
    from mambalrp.models.zoo import available_models

    return name in available_models()


def _zoo_labels(spec: ModelSpec) -> tuple[str, ...] | None:
    if isinstance(spec, str) and not os.path.exists(spec) and _zoo_has(spec):
        from mambalrp.models.zoo import model_info

        labels = model_info(spec).get("labels")
        return tuple(labels) if labels else None
    return None


def _spec_name(spec: ModelSpec) -> str:
    if isinstance(spec, str):
        return spec
    return f"{getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', type(spec).__name__)}"


def read_data(path: str | os.PathLike, text_column: str = "text") -> Any:
    """Read a ``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or ``.txt`` file into a ``pyarrow.Table``.

    A ``.txt`` file has one text per line (in ``text_column``). Lines of a ``.txt`` or ``.jsonl``
    file that are not valid UTF-8 are kept as bytes (the row gets an "undecodable" error instead of
    failing the read).

    Raises:
        InputError: The file does not exist or has another extension; a ``.jsonl`` line (valid
            UTF-8) is not JSON.
    """
    import pyarrow as pa

    from mambalrp.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        return pa.table({text_column: _text_array([_decoded(line.rstrip(b"\r")) for line in lines])})
    if suffix == ".jsonl":
        records: list[dict[str, Any]] = []
        for number, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:  # the row will carry the error
                records.append({text_column: line})
                continue
            try:
                record = json.loads(text)
            except ValueError as err:
                raise InputError(f"{path.name}, line {number}: not JSON ({err})") from err
            records.append(record if isinstance(record, dict) else {text_column: record})
        return _from_records(records, text_column)
    if suffix == ".json":
        content = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(content, dict):  # {"column": [values]}
            return pa.table(content)
        return _from_records([r if isinstance(r, dict) else {text_column: r} for r in content], text_column)
    if suffix == ".csv":
        import pyarrow.csv as csv

        return csv.read_csv(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    raise InputError(f"unsupported data file {path.name!r}: use .jsonl, .json, .csv, .parquet or .txt")


def _decoded(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _text_array(values: list[Any]) -> Any:
    """Strings as an Arrow string column; if some are bytes, all as a binary column."""
    import pyarrow as pa

    if any(isinstance(v, (bytes, bytearray)) for v in values):
        return pa.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], pa.binary())
    return pa.array(values)


def _from_records(records: list[dict[str, Any]], text_column: str) -> Any:
    import pyarrow as pa

    names: list[str] = []
    for r in records:
        names.extend(k for k in r if k not in names)
    columns = {}
    for name in names:
        values = [r.get(name) for r in records]
        columns[name] = _text_array(values) if name == text_column else pa.array(values)
    return pa.table(columns)


def _as_table(data: Any, text_column: str, ray: Any) -> Any:
    """The input as a ``pyarrow.Table``, rows in the input's order."""
    import pyarrow as pa

    from mambalrp.errors import InputError

    if isinstance(data, (str, os.PathLike)):
        return read_data(data, text_column)
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, ray.data.Dataset):
        refs = data.to_arrow_refs()
        tables = [t for t in ray.get(refs) if t.num_rows]
        return pa.concat_tables(tables) if tables else pa.table({text_column: pa.array([], pa.string())})
    if isinstance(data, (list, tuple)):
        if all(isinstance(v, dict) for v in data) and data:
            return _from_records(list(data), text_column)
        return pa.table({text_column: _text_array(list(data))})
    module = type(data).__module__.split(".")[0]
    if module == "pandas":
        return pa.Table.from_pandas(data, preserve_index=False)
    if module == "datasets" and hasattr(data, "with_format"):  # Hugging Face datasets: Arrow inside
        return data.with_format("arrow")[:]
    raise InputError(
        f"unsupported data of type {type(data).__name__}: pass a list of texts, a list of dicts, a pandas "
        "DataFrame, a pyarrow Table, a Hugging Face or Ray dataset, or a file path"
    )


def _shards(table: Any, text_column: str, shard_size: int, done: set[int]) -> list[Any]:
    """Rows not yet done, sorted by text length (ties by id), in slices of ``shard_size``."""
    import pyarrow as pa

    texts = table.column(text_column).to_pylist()
    ids = [i for i in range(table.num_rows) if i not in done]
    ids.sort(key=lambda i: (len(texts[i]) if isinstance(texts[i], (str, bytes)) else 0, i))
    return [table.take(pa.array(ids[s:s + shard_size], pa.int64())) for s in range(0, len(ids), shard_size)]


def _ipc(table: Any) -> bytes:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _shard_name(row_ids: Sequence[int]) -> str:
    digest = hashlib.sha1(",".join(map(str, sorted(row_ids))).encode()).hexdigest()[:12]
    return f"{_PART_PREFIX}{min(row_ids):010d}-{digest}.parquet"


def _write_shard(directory: Path, table: Any) -> Path:
    """Write atomically under a name fixed by the shard's row ids (a retry rewrites the same file)."""
    import pyarrow.parquet as pq

    final = directory / _shard_name(table.column("row_id").to_pylist())
    tmp = directory / f"{_TMP_PREFIX}{os.getpid()}-{final.name}"
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def _parts(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"{_PART_PREFIX}*.parquet"))


def _read_output(ray: Any, directory: Path | None) -> Any:
    """A lazy dataset over the shard files, one read per file.

    Ray's ``read_parquet`` would do too, but its path resolution probes fsspec's HTTP file system,
    whose import can fail half-way in one thread while another uses it (seen without aiohttp).
    """
    parts = [str(p) for p in _parts(directory)]
    paths = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=len(parts))
    return paths.map_batches(_read_parts, batch_size=1, batch_format="numpy")


def _read_parts(batch: dict[str, Any]) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(str(p)) for p in batch["path"]])


def _manifest(spec: ModelSpec, options: RowOptions, table: Any, shard_size: int) -> dict[str, Any]:
    """What identifies a job: resuming it with other data or settings would mix two jobs."""
    digest = hashlib.sha1()
    for value in table.column(options.text_column).to_pylist():
        digest.update(repr(value).encode("utf-8", "backslashreplace") + b"\0")
    return {
        "format": 1,
        "model": _spec_name(spec),
        "rows": table.num_rows,
        "columns": table.column_names,
        "texts_sha1": digest.hexdigest(),
        "text_column": options.text_column,
        "target": options.target,
        "labels": list(options.labels) if options.labels is not None else None,
        "max_length": options.max_length,
        "on_error": options.on_error,
        "rules": options.rules_name,
        "recompute": options.recompute,
    }


def _prepare_output(directory: Path, manifest: dict[str, Any], resume: bool) -> set[int]:
    """Create or check ``directory``; return the row ids already written there."""
    import pyarrow.parquet as pq

    from mambalrp.errors import InputError

    directory.mkdir(parents=True, exist_ok=True)
    for tmp in directory.glob(f"{_TMP_PREFIX}*"):  # left by a worker killed while writing
        tmp.unlink(missing_ok=True)
    parts = _parts(directory)
    path = directory / MANIFEST
    if parts and not resume:
        raise InputError(f"{directory} already holds {len(parts)} shards; resume=True continues that job, or choose another directory")
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in manifest if before.get(k) != json.loads(json.dumps(manifest[k]))]
        if changed and parts:
            raise InputError(
                f"{directory} holds a job with other data or settings ({', '.join(changed)} differ); "
                "use another directory, or remove it to start again"
            )
    elif parts:
        raise InputError(f"{directory} holds shards but no {MANIFEST}: it was not written by explain_dataset")
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    done: set[int] = set()
    for part in parts:
        done.update(pq.read_table(part, columns=["row_id"]).column("row_id").to_pylist())
    return done


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class _Progress:
    """Shard progress: a callback, a tqdm bar, or lines on stderr."""

    def __init__(self, show: bool | Callable[[dict[str, Any]], None], total: int, done: int) -> None:
        self.callback = show if callable(show) else None
        self.total, self.done, self.initial, self.start = total, done, done, time.perf_counter()
        self.bar = None
        if show is True:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=done, unit="ex", desc="explain_dataset", file=sys.stderr)
            except ImportError:
                self.bar = None
        self.lines = show is True and self.bar is None

    def __call__(self, summary: dict[str, Any]) -> None:
        self.done += int(summary["rows"])
        if self.callback is not None:
            self.callback(summary)
        if self.bar is not None:
            self.bar.update(int(summary["rows"]))
        elif self.lines:
            rate = (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)
            print(f"explain_dataset: {self.done}/{self.total} rows ({rate:.1f}/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
