"""Where a dataset's rows come from: a file, a folder, or a Hugging Face Hub id, at a subset and a split.

Sources, as users have them:
- files: `.jsonl` (one object a line), `.json` (a list of objects, or one object a line), `.csv` (a header
  row), `.parquet`; a file is one split, so a split named for it is not checked;
- a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose split is chosen);
- any other folder (parquet/json/csv shards as a Hub download lays them out, with or without a README that
  declares subsets) and a Hub id (`openai/gsm8k`, resolved to its snapshot by `services.core.hub`): read by
  `datasets.load_dataset(folder, name=subset, split=split)`, the loader TRL users call.
Guarantees: every row comes with where it was read (`file, line N` / `source, row N`) for error messages; a
source that cannot be read, an unknown subset or split is one `DatasetError` naming the source and what it
has; nothing is read half.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.core.hub import HubError, hub_snapshot, looks_like_hub_id


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file, the line or row, and the field."""


Rows = Iterator[tuple[str, Any]]
"""(where, row) pairs: `where` names the file and line or row for messages."""


@dataclass(frozen=True)
class Source:
    """One dataset as a setting names it, with the subset and split to read and the Hub revision."""

    spec: str
    subset: str | None = None
    split: str | None = None
    revision: str | None = None
    setting: str = "data.dataset"
    """The config key that named it, for messages."""

    def describe(self) -> str:
        """`openai/gsm8k (main, test)`, `train.jsonl`: how logs and evaluation lines name it."""
        extra = [p for p in (self.subset, self.split) if p] if self.is_multi_split() else []
        return f"{self.spec} ({', '.join(extra)})" if extra else self.spec

    def is_multi_split(self) -> bool:
        """Whether the source can hold several splits (a folder or a Hub id, not one file)."""
        return looks_like_hub_id(self.spec) or Path(self.spec).is_dir()


def _where(source: Source) -> str:
    return f"{source.setting} {source.spec!r}"


def local_path(source: Source) -> Path:
    """The file or folder holding `source`: the path itself, or the Hub snapshot of a dataset id."""
    if looks_like_hub_id(source.spec):
        try:
            return hub_snapshot(source.spec, "dataset", source.revision, source.setting)
        except HubError as exc:
            raise DatasetError(f"{exc} (and there is no local path {source.spec!r})") from None
    path = Path(source.spec)
    if not path.exists():
        raise DatasetError(f"dataset not found: {path} ({source.setting})")
    return path


def source_rows(source: Source) -> Rows:
    """Every row of `source` (see the module docstring for the formats)."""
    path = local_path(source)
    if path.is_dir():
        return _table_rows(_folder_table(path, source), source.describe())
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DatasetError(
            f"{path}: unsupported dataset format ({source.setting}); use .jsonl, .json, .csv, .parquet, a "
            "folder (a `datasets` save, or parquet/json/csv shards) or a Hugging Face Hub id"
        )
    return reader(path)


def available_splits(source: Source) -> tuple[str, ...] | None:
    """The splits a folder or Hub dataset has (of its subset); None for a single file (one split)."""
    path = local_path(source)
    if not path.is_dir():
        return None
    saved = _saved_by_datasets(path)
    if saved is not None:
        return tuple(saved) if isinstance(saved, dict) else None
    folder, name = _subset_folder(path, source)
    builder = _builder(folder, name, source)
    return tuple(builder.config.data_files or ())


def _saved_by_datasets(path: Path) -> Any | None:
    """The `Dataset`/`DatasetDict` (its splits as a dict) in a `save_to_disk` folder; None for other folders."""
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return None
    # lazy: heavy import (datasets), paid only on this path
    import datasets

    try:
        table = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DatasetError(f"{path}: not a readable saved `datasets` directory: {exc}") from None
    return dict(table) if isinstance(table, datasets.DatasetDict) else table


def _subset_folder(path: Path, source: Source) -> tuple[Path, str | None]:
    """The folder and `name` to give `load_dataset`: a subset the README declares, else a sub-folder named
    after the subset (a Hub layout without a README), else the subset as given (refused by the loader)."""
    if source.subset and (path / source.subset).is_dir() and not (path / "README.md").is_file():
        return path / source.subset, None
    return path, source.subset


def _builder(folder: Path, name: str | None, source: Source) -> Any:
    # lazy: heavy import (datasets), paid only on this path
    import datasets

    try:
        return datasets.load_dataset_builder(str(folder), name=name)
    except ValueError as exc:  # an unknown subset: "BuilderConfig 'x' not found. Available: [...]"
        raise DatasetError(f"{_where(source)}: subset {source.subset!r} (data.subset): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a folder it cannot read
        raise DatasetError(f"{_where(source)}: cannot read {folder} as a dataset: {exc}") from None


def _folder_table(path: Path, source: Source) -> Iterable[dict]:
    saved = _saved_by_datasets(path)
    if isinstance(saved, dict):
        split = source.split or "train"
        if split not in saved:
            raise DatasetError(
                f"{_where(source)}: no split {split!r} in this DatasetDict; it has {', '.join(saved)} "
                f"(set the split: data.split, data.eval_split or data.val_split)"
            )
        return saved[split]
    if saved is not None:
        return saved
    folder, name = _subset_folder(path, source)
    splits = tuple(_builder(folder, name, source).config.data_files or ())
    split = source.split or "train"
    if split not in splits:
        raise DatasetError(
            f"{_where(source)}: no split {split!r}"
            + (f" in subset {source.subset!r}" if source.subset else "")
            + f"; it has {', '.join(splits) or 'none'} (data.split, data.eval_split, data.val_split)"
        )
    # lazy: heavy import (datasets), paid only on this path
    import datasets

    try:
        return datasets.load_dataset(str(folder), name=name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for files it cannot parse
        raise DatasetError(f"{_where(source)}: cannot read split {split!r} of {folder}: {exc}") from None


def _decode_error(path: Path, exc: UnicodeDecodeError, offset_base: int = 0) -> DatasetError:
    return DatasetError(
        f"{path}: not UTF-8 text (byte {offset_base + exc.start}: {exc.reason}); save it as UTF-8"
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from None


def _jsonl_rows(path: Path) -> Rows:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}, line {lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}, line {lineno}: not valid JSON: {exc.msg}") from None


def _json_rows(path: Path) -> Rows:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object a line, as `datasets` writes .json files
            yield from _jsonl_rows(path)
            return
        raise DatasetError(f"{path}, line {exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a list of objects (one a question), got {type(value).__name__}")
    for index, row in enumerate(value):
        yield f"{path}, item {index}", row


def _csv_rows(path: Path) -> Rows:
    lines = _read_text(path).splitlines(keepends=True)
    try:
        reader = csv.DictReader(lines)
        for row in reader:
            if None in row:  # more cells than the header names
                raise DatasetError(f"{path}, line {reader.line_num}: more values than the header has columns")
            yield f"{path}, line {reader.line_num}", {k: v for k, v in row.items() if v is not None}
    except csv.Error as exc:
        raise DatasetError(f"{path}: not valid CSV: {exc}") from None


def _parquet_rows(path: Path) -> Rows:
    # lazy: heavy import (pyarrow), paid only on this path
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DatasetError(f"{path}: not a readable parquet file: {exc}") from None
    return _table_rows(table, str(path))


def _table_rows(rows: Iterable[dict], origin: str) -> Rows:
    for index, row in enumerate(rows):
        yield f"{origin}, row {index}", row
