"""Where the rows come from: JSONL files as they are, or any other source turned into JSONL once.

Parquet files (train.parquet, or the hub's data/train-00000-of-00002.parquet shards), a folder datasets'
save_to_disk wrote, a hub dataset (data.hf_dataset), and JSONL whose keys data.columns renames are written as JSONL
into the overnight cache (OVERNIGHT_CACHE, else $XDG_CACHE_HOME/overnight, else ~/.cache/overnight), under data/,
row N of a split as line N. Everything after that (the data check and its refusals, the resumable order by byte
offsets, file stamps, the checkpoint's sha256 of the train and validation files) is the JSONL path, unchanged. The
file's name is a hash of what identifies the source's content (the source files' sha256, or the hub dataset's
datasets fingerprint) and the column mapping, so a second start reads the same file and a changed source gives
another file, whose sha256 a resume refuses. Beside each copy a record (NAME.jsonl.sha256) holds its sha256: a copy
that no longer matches it (truncated, edited) or has none is written again from the source before it is used. A
copy is published with a hard link, never over one that is there: processes converting the same source at once
(a data-parallel job's ranks, two runs) all end up reading the first one written, and a process already reading it
never sees it replaced (its file-stamp guard would stop the run). Every message names the user's source and row
(formats.SourceLabel), never the cache file.

Values arrow gives that JSON has no type for are converted where the meaning is plain (numpy scalars to numbers,
dates and times to ISO 8601 text, decimals to numbers, UTF-8 bytes to text, a map to an object) and refused by
split, row and column otherwise (binary data, NaN, durations). A float32 or float16 value is written as the
shortest decimal that is that value (a float32 0.1 is 0.1, not 0.10000000149011612: an exact_match reward compares
its text). A null field is dropped, at any depth: arrow gives every row every field of a struct (a message's
tool_calls) and every column, filling the ones a row lacked with null, and a missing key is what the row meant (a
null where a value is needed is then refused as that key missing); a null item of a list stays null.
"""
from __future__ import annotations

import datetime
import decimal
import hashlib
import json
import math
import os
import re
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from overnight.data.formats import (
    SHOWN_PROBLEMS,
    DataError,
    SourceLabel,
    find_jsonl_files,
    line_content,
    parse_line,
    register_label,
    stamp_of,
)
from overnight.fsutil import fsync_file, overnight_cache_dir, sha256_file

CONVERSION_VERSION = 2  # in every cache key: a change in how rows are written makes new files
# What each version changed in the rows it writes: a run trained on an earlier version's copy is told, at its resume,
# that overnight rewrote its data, not that the user did.
CONVERSION_CHANGES = {
    2: "float32 and float16 values written as their shortest decimal (0.1, not 0.10000000149011612), maps as objects "
       "(they were lists of [key, value] pairs)",
}
VAL_SPLITS = ("validation", "val", "valid", "test")  # the first one a source has is its validation split
DATA_EXTRA = "pip install 'overnight[data]'"
_SHARD = r"-(\d+)-of-(\d+)(?:-[0-9a-zA-Z]+)?\.parquet"  # the hub's train-00000-of-00002[-hash].parquet


def find_data_files(data_path: Path, columns: dict[str, str] | None = None,
                    hf_dataset: Any = None) -> tuple[Path, Path | None]:
    """(train file, validation file or None) as JSONL, from whatever the user's data is (module docstring).
    ``columns``: data.columns; ``hf_dataset``: data.hf_dataset (its name, when set, replaces ``data_path``)."""
    columns = dict(columns or {})
    if hf_dataset is not None and getattr(hf_dataset, "name", None):
        return _hub_files(hf_dataset, columns)
    data_path = Path(data_path)
    layouts = _layouts(data_path) if data_path.is_dir() else []
    if len(layouts) > 1:
        raise DataError(f"{data_path}: holds training rows in more than one layout ({'; '.join(n for n, _ in layouts)})"
                        " -> keep one, or pass --data with the file or folder of the one to train on")
    if layouts:
        return layouts[0][1](columns)
    if data_path.is_file() and data_path.suffix == ".parquet":
        return _parquet_files(data_path, [data_path], None, columns)
    train, val = find_jsonl_files(data_path)  # today's JSONL, or its refusal listing every layout
    if not columns:
        return train, val
    return _renamed_jsonl(train, data_path, columns), _renamed_jsonl(val, data_path, columns) if val else None


# ---------------------------------------------------------------------------
# Which layout a folder holds

def _layouts(folder: Path) -> list[tuple[str, Callable[[dict], tuple[Path, Path | None]]]]:
    """(description, reader) for each layout found in ``folder``: more than one is refused, none leaves the
    folder to the JSONL refusal."""
    found = []
    if (folder / "train.jsonl").exists():
        found.append(("train.jsonl", lambda columns: _jsonl_folder(folder, columns)))
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file() and \
            (folder / "dataset_info.json").is_file():
        found.append(("a datasets save_to_disk folder", lambda columns: _saved_dataset_files(folder, columns)))
    if (folder / "train.parquet").is_file():
        val = next((folder / f"{s}.parquet" for s in VAL_SPLITS if (folder / f"{s}.parquet").is_file()), None)
        found.append(("train.parquet", lambda columns: _parquet_files(folder, [folder / "train.parquet"],
                                                                      [val] if val else None, columns)))
    for shard_dir in (folder / "data", folder):
        train = _shards(shard_dir, "train")
        if train:
            val = next((s for s in (_shards(shard_dir, v) for v in VAL_SPLITS) if s), None)
            found.append((f"{shard_dir / 'train-*.parquet'} shards",
                          lambda columns, t=train, v=val: _parquet_files(folder, t, v, columns)))
            break
    return found


def _jsonl_folder(folder: Path, columns: dict) -> tuple[Path, Path | None]:
    train, val = find_jsonl_files(folder)
    if not columns:
        return train, val
    return _renamed_jsonl(train, folder, columns), _renamed_jsonl(val, folder, columns) if val else None


def _shards(folder: Path, split: str) -> list[Path]:
    """The shards of ``split`` in shard order; every one of N must be there."""
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(split) + _SHARD)
    matched = sorted((int(m.group(1)), int(m.group(2)), p) for p in folder.iterdir()
                     if (m := pattern.fullmatch(p.name)) and p.is_file())
    if not matched:
        return []
    total = matched[0][1]
    have = [index for index, _, _ in matched]
    if have != list(range(total)) or any(of != total for _, of, _ in matched):
        missing = sorted(set(range(total)) - set(have))
        raise DataError(f"{folder / (split + '-*.parquet')}: the shards do not make a whole split (found "
                        f"{len(matched)} file(s) for {total} shard(s)"
                        + (f"; missing {', '.join(f'{i:05d}' for i in missing[:5])}" if missing else "")
                        + ") -> download the missing shards again, or remove the stray ones")
    return [p for _, _, p in matched]


# ---------------------------------------------------------------------------
# Sources

def _need(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise DataError(f"{what} needs the optional packages datasets and pyarrow -> {DATA_EXTRA}") from None


def _parquet_files(data_path: Path, train: list[Path], val: list[Path] | None,
                   columns: dict) -> tuple[Path, Path | None]:
    pq = _need("pyarrow.parquet", f"{data_path}: reading parquet")

    def open_file(path: Path):
        try:
            return pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a damaged or non-parquet file vary
            raise DataError(f"{path}: cannot be read as parquet ({exc}) -> check the file, or export it "
                            "again") from None

    def convert(files: list[Path]) -> Path:
        name = str(files[0]) if len(files) == 1 else \
            str(files[0].parent / re.sub(_SHARD, "-*.parquet", files[0].name))
        shards = tuple((str(p), open_file(p).metadata.num_rows) for p in files) if len(files) > 1 else ()
        label = SourceLabel(name, columns, _command_args([str(data_path)], columns), shards)

        def batches() -> Iterator[Any]:
            for path in files:
                pf = open_file(path)
                yield from _read(pf.iter_batches(batch_size=1024), f"{path}: cannot be read as parquet",
                                 "check the file, or export it again")

        return _local_copy(label, files, columns, lambda f: _write_arrow_rows(f, label, batches(), columns))

    return convert(train), convert(val) if val else None


def _saved_dataset_files(folder: Path, columns: dict) -> tuple[Path, Path | None]:
    datasets = _need("datasets", f"{folder}: reading a datasets save_to_disk folder")
    try:
        saved = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, json errors...
        empty = _empty_splits(folder)
        if empty:  # datasets saves a split with no rows but cannot load the DatasetDict again (IndexError)
            raise DataError(f"{folder} split '{empty[0]}': has no rows, and datasets cannot load a DatasetDict saved "
                            f"with an empty split ({exc or type(exc).__name__}) -> save it again without that split "
                            f"(del ds[{empty[0]!r}] before ds.save_to_disk(...)), or with rows in it") from None
        raise DataError(f"{folder}: cannot be read as a datasets save_to_disk folder ({exc}) -> save it again with "
                        "ds.save_to_disk(...) (a DatasetDict with a train split, or one Dataset)") from None
    command = _command_args([str(folder)], columns)

    def convert(dataset: Any, split_folder: Path, name: str) -> Path:
        label = SourceLabel(name, columns, command)
        files = sorted(p for p in split_folder.rglob("*") if p.is_file())
        fix = "save it again with ds.save_to_disk(...)"
        return _local_copy(label, files, columns,
                           lambda f: _write_arrow_rows(f, label, _dataset_batches(dataset, name, fix), columns))

    if not isinstance(saved, datasets.DatasetDict):  # one Dataset: the training rows
        return convert(saved, folder, str(folder)), None
    train, val = _pick_splits(list(saved), "train", None, f"{folder} (a DatasetDict)")
    return (convert(saved[train], folder / train, f"{folder} split '{train}'"),
            convert(saved[val], folder / val, f"{folder} split '{val}'") if val else None)


def _empty_splits(folder: Path) -> list[str]:
    """The splits of a saved DatasetDict that were saved with no rows (no arrow files)."""
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        return [split for split in splits
                if json.loads((folder / split / "state.json").read_text(encoding="utf-8")).get("_data_files") == []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


_HUB_MEMO: dict[tuple, tuple[Path, Path | None]] = {}


def _hub_files(hf: Any, columns: dict) -> tuple[Path, Path | None]:
    asked = (hf.name, hf.config, hf.train_split, hf.val_split, tuple(columns.items()))
    if asked in _HUB_MEMO and all(p is None or p.is_file() for p in _HUB_MEMO[asked]):
        return _HUB_MEMO[asked]  # the run's own check and the data check ask in one process: loaded once
    shown = f"hub dataset {hf.name}" + (f" (config {hf.config})" if hf.config else "")
    datasets = _need("datasets", f"{shown}: data.hf_dataset")
    try:
        loaded = datasets.load_dataset(hf.name, hf.config)
    except Exception as exc:  # noqa: BLE001 - offline, not found, a gated dataset, a bad config name...
        raise DataError(_hub_failure(shown, hf, exc)) from None
    train, val = _pick_splits(list(loaded), hf.train_split, hf.val_split, shown)
    args = ["--set", f"data.hf_dataset.name={hf.name}"]
    for key, default in (("config", None), ("train_split", "train"), ("val_split", None)):
        if getattr(hf, key) != default:
            args += ["--set", f"data.hf_dataset.{key}={getattr(hf, key)}"]
    command = _command_args(args, columns)

    def convert(split: str) -> Path:
        label = SourceLabel(f"{shown} split '{split}'", columns, command)
        dataset = loaded[split]
        # datasets' fingerprint of a split follows its files in the Hugging Face cache: a new revision, a new copy
        identity = json.dumps(["hub", hf.name, hf.config, split, dataset._fingerprint])
        fix = "remove its folder from the Hugging Face cache (HF_DATASETS_CACHE) to have it downloaded again"
        return _copy(label, identity, columns,
                     lambda f: _write_arrow_rows(f, label, _dataset_batches(dataset, label.name, fix), columns))

    _HUB_MEMO[asked] = (convert(train), convert(val) if val else None)
    return _HUB_MEMO[asked]


def _hub_failure(shown: str, hf: Any, exc: Exception) -> str:
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    why = "offline (HF_HUB_OFFLINE) and not in the Hugging Face cache" if offline else "could not be loaded"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if hf.config and "BuilderConfig" in detail and "not found" in detail:  # datasets' ValueError for a bad config
        return (f"{shown}: has no config {hf.config!r} ({detail}) -> set data.hf_dataset.config to one of its "
                "configs, or leave it unset for a dataset with one")
    local = Path(hf.name).expanduser()
    if hf.name.startswith(("/", ".", "~")) or local.exists():  # a folder on this machine: offline is not why
        why = "could not be loaded" if local.exists() else "no such folder"
        return f"{shown}: {why} ({detail}) -> check data.hf_dataset.name, or pass the folder with --data"
    call = f"datasets.load_dataset({hf.name!r}{', ' + repr(hf.config) if hf.config else ''})"
    return (f"{shown}: {why} ({detail}) -> check data.hf_dataset.name{' and .config' if hf.config else ''}; to "
            f"work offline, run once online (the dataset is downloaded once into the Hugging Face cache), or on a "
            f"machine online save it with {call}.save_to_disk('DIR') and pass --data DIR")


def _pick_splits(have: list[str], train_split: str, val_split: str | None, shown: str) -> tuple[str, str | None]:
    """The train split and the validation split: the one named, else the first of VAL_SPLITS there is."""
    listed = ", ".join(have)
    if train_split not in have:
        fix = ("set data.hf_dataset.train_split to the one with the training rows" if shown.startswith("hub ")
               else "save the training rows as the split 'train'")
        raise DataError(f"{shown}: has no split '{train_split}' (its splits: {listed}) -> {fix}")
    if val_split is not None and val_split not in have:
        raise DataError(f"{shown}: has no split '{val_split}' (its splits: {listed}) -> set "
                        "data.hf_dataset.val_split to one of them, or leave it unset to take the first of "
                        f"{', '.join(VAL_SPLITS)} there is")
    return train_split, val_split or next((s for s in VAL_SPLITS if s in have and s != train_split), None)


def _dataset_batches(dataset: Any, shown: str, fix: str) -> Iterator[Any]:
    """The rows as arrow holds them (no feature decoding: an image stays its bytes, and is refused as such)."""
    yield from _read(dataset.with_format("arrow").iter(batch_size=1024), f"{shown}: cannot be read", fix)


def _read(tables: Iterable[Any], failed: str, fix: str) -> Iterator[Any]:
    """``tables``, a damaged source (a corrupt page, a truncated arrow file) refused as ``failed`` (exit 2), not
    taken for a cache that cannot be written or shown as a traceback."""
    it = iter(tables)
    while True:
        try:
            table = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - pyarrow's OSError, ArrowInvalid, datasets' own errors...
            raise DataError(f"{failed} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}) -> "
                            f"{fix}") from None
        yield table


def _command_args(source: list[str], columns: dict) -> tuple[str, ...]:
    """validate-data's arguments for the same rows (shell-quoted): the source and the column mapping."""
    args = list(source)
    if columns:
        args += ["--set", "data.columns={" + ", ".join(f"{k}: {v}" for k, v in columns.items()) + "}"]
    return tuple(shlex.quote(a) for a in args)


def _renamed_jsonl(path: Path, data_path: Path, columns: dict) -> Path:
    """``path`` with data.columns applied. Line N of the copy is line N of ``path`` (blank lines and lines that do
    not parse are copied as they are, for the data check to name at the same line); values are kept as they are."""
    label = SourceLabel(str(path), columns, _command_args([str(data_path)], columns), lines=True)
    return _local_copy(label, [path], columns, lambda f: _write_renamed_lines(f, label, path, columns))


# ---------------------------------------------------------------------------
# Writing the JSONL copy

# The same source is asked for more than once in a process (the run's own check, then the data check): by the
# source files' stamps, the copy found the first time, without hashing the files again.
_LOCAL_MEMO: dict[tuple, Path] = {}


def _local_copy(label: SourceLabel, files: list[Path], columns: dict, write: Callable) -> Path:
    stamps = tuple((os.path.realpath(p), stamp_of(p)) for p in files)
    asked = (label.name, label.lines, tuple(columns.items()), stamps)
    if asked in _LOCAL_MEMO and _LOCAL_MEMO[asked].is_file():
        register_label(_LOCAL_MEMO[asked], label)
        return _LOCAL_MEMO[asked]
    identity = json.dumps([[str(p.name), sha256_file(p)] for p in files])
    _LOCAL_MEMO[asked] = _copy(label, identity, columns, write)
    return _LOCAL_MEMO[asked]


# A copy this process converted (its real path) -> (digest of its source and mapping, identity, columns, slug):
# what conversion_of records and earlier_copy_sha256 finds an earlier converter's copy by.
_CONVERTED: dict[str, tuple[str, str, dict, str]] = {}


def conversion_of(path: Path | None) -> dict | None:
    """How the JSONL file ``path`` was written from the user's source, for a checkpoint's fingerprint:
    {"converter": the version, "source": a digest of the source's content and data.columns}; None for a file
    that is the user's own."""
    found = _CONVERTED.get(os.path.realpath(path)) if path is not None else None
    return {"converter": CONVERSION_VERSION, "source": found[0]} if found else None


def earlier_copy_sha256(source: str, version: int) -> str | None:
    """The sha256 of the copy converter ``version`` wrote from the source with digest ``source`` (conversion_of),
    if it is still in the cache and intact; None otherwise (never converted there, or removed)."""
    found = next((entry for entry in _CONVERTED.values() if entry[0] == source), None)
    if found is None:
        return None
    out = _copy_path(version, *found[1:])
    try:
        return json.loads(_record_path(out).read_text(encoding="utf-8"))["sha256"] if _intact(out) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _copy_path(version: int, identity: str, columns: dict, slug: str) -> Path:
    digest = hashlib.sha256(json.dumps([version, identity, sorted(columns.items())]).encode()).hexdigest()
    return overnight_cache_dir() / "data" / f"{slug}-{digest[:24]}.jsonl"


def _copy(label: SourceLabel, identity: str, columns: dict, write: Callable) -> Path:
    """The cached JSONL copy of one split, named by ``identity`` (what its content follows from) and the mapping;
    ``write(file)`` writes it the first time."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", label.name).strip("_.")[-60:] or "rows"
    out = _copy_path(CONVERSION_VERSION, identity, columns, slug)
    register_label(out, label)
    source = hashlib.sha256(json.dumps([identity, sorted(columns.items())]).encode()).hexdigest()
    _CONVERTED[os.path.realpath(out)] = (source, identity, dict(columns), slug)
    if out.is_file() and _intact(out):
        return out
    again = " once" if not out.is_file() else " again (the copy there does not match the sha256 recorded when it " \
        "was written)" if _record_path(out).is_file() else " again (the copy there has no record of its sha256)"
    print(f"overnight: converting {label.name} to JSONL{again} (cached as {out})", file=sys.stderr, flush=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                write(f)
            fsync_file(tmp)
            _publish(tmp, out, sha256_file(tmp))
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"{label.name}: the converted rows cannot be written to {out.parent} ({exc.strerror or exc})"
                        " -> free some space, or set OVERNIGHT_CACHE to a writable folder") from None
    return out


def _record_path(out: Path) -> Path:
    return out.with_name(out.name + ".sha256")


def _intact(out: Path) -> bool:
    """The copy is the one that was written: its recorded sha256, checked by reading it unless the file's stamp
    (inode, size, modification time) is the one recorded with it."""
    try:
        record = json.loads(_record_path(out).read_text(encoding="utf-8"))
        stamp = stamp_of(out)
        if stamp is None or stamp.size != record["size"]:
            return False
        if [stamp.inode, stamp.mtime_ns] == record.get("stamp"):
            return True
        if sha256_file(out) != record["sha256"]:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    _write_record(out, record["sha256"])  # touched or copied back, same rows: the stamp is checked from now on
    return True


def _write_record(out: Path, sha256: str) -> None:
    stamp = stamp_of(out)
    if stamp is None:
        return
    record = _record_path(out)
    tmp = record.with_name(f"{record.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps({"sha256": sha256, "size": stamp.size, "stamp": [stamp.inode, stamp.mtime_ns]}),
                       encoding="utf-8")
        os.replace(tmp, record)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, out: Path, sha256: str) -> None:
    """``tmp`` as ``out``, whole or not at all. A copy already there with the same content is kept as it is: another
    process converting the same split may have written it and be reading it now."""
    try:
        os.link(tmp, out)  # fails where a file is there; never replaces one
    except FileExistsError:
        if _content_is(out, sha256):
            _write_record(out, sha256)
            return
        os.replace(tmp, out)  # a damaged copy: the rows written now replace it
    except OSError:  # a file system without hard links
        if not _content_is(out, sha256):
            os.replace(tmp, out)
    _write_record(out, sha256)


def _content_is(path: Path, sha256: str) -> bool:
    try:
        return sha256_file(path) == sha256
    except OSError:
        return False


def _write_arrow_rows(f, label: SourceLabel, batches: Iterable[Any], columns: dict) -> None:
    """One JSON object a line, nulls dropped, keys renamed by data.columns; values without a JSON form are refused
    all at once, by row and column. ``batches``: arrow tables or record batches."""
    rename = {column: key for key, column in columns.items()}
    have: list[str] = []
    problems: list[str] = []
    count = line = 0
    for table in batches:
        names = table.schema.names
        if not have:  # arrow gives every row every column: the first batch's are the columns
            _check_mapping(label, columns, names)
        have += [n for n in names if n not in have]
        types = {field.name: field.type if _typed(field.type) else None for field in table.schema}
        for row in _pylist(table, label, line):
            line += 1
            out: dict[str, Any] = {}
            for column, value in row.items():
                try:
                    value = _json_value(value, types.get(column))
                except _NotJson as exc:
                    count += 1
                    if len(problems) < SHOWN_PROBLEMS:
                        problems.append(f"{label.at(line)}: column '{column}' {exc}, which a JSON row cannot hold "
                                        "-> convert the column to text or numbers (ds.map, ds.cast_column) or "
                                        "remove it (ds.remove_columns)")
                    continue
                if value is not None:
                    out[rename.get(column, column)] = value
            f.write(_jsonl_line(out))
    if count:
        more = f"\n  ... and {count - len(problems)} more" if count > len(problems) else ""
        raise DataError(f"{count} value(s) in the data have no JSON form; nothing was trained or written:\n  "
                        + "\n  ".join(problems) + more)


def _pylist(table: Any, label: SourceLabel, before: int) -> list[dict]:
    """The rows of ``table`` as Python values; a column Python cannot hold (a date past the year 9999) is refused
    by name."""
    try:
        return table.to_pylist()
    except Exception as exc:  # noqa: BLE001 - OverflowError, ValueError, ArrowNotImplementedError...
        failed = exc
    for name, column in zip(table.schema.names, table.columns):
        try:
            column.to_pylist()
        except Exception as exc:  # noqa: BLE001 - as above
            failed, where = exc, name
            break
    else:
        where = None
    detail = str(failed).splitlines()[0] if str(failed) else type(failed).__name__
    rows = f"{label.at(before + 1)} to {label.at(before + table.num_rows)}" if table.num_rows > 1 else \
        label.at(before + 1)
    raise DataError(f"{rows}: {f'column {where!r}' if where else 'a column'} cannot be read into Python ({detail}), "
                    "which a JSON row needs -> convert the column to text or numbers (ds.map, ds.cast_column) or "
                    "remove it (ds.remove_columns)")


def _write_renamed_lines(f, label: SourceLabel, path: Path, columns: dict) -> None:
    rename = {column: key for key, column in columns.items()}
    have: list[str] = []
    with open(path, "rb") as lines:
        for lineno, raw in enumerate(lines, 1):
            content = line_content(raw, lineno == 1)
            row, err = parse_line(content) if content else (None, "blank")
            if err:
                f.write(content + b"\n")
                continue
            for key, column in columns.items():
                if column in row and key in row and key not in rename:
                    raise DataError(f"{path}:{lineno}: data.columns maps the key '{column}' to '{key}', but the row "
                                    f"also has '{key}' -> remove that mapping, or the key '{key}'")
            have += [k for k in row if k not in have]
            f.write(_jsonl_line({rename.get(k, k): v for k, v in row.items()}))
    _check_mapping(label, columns, have)


def _check_mapping(label: SourceLabel, columns: dict, have: list[str]) -> None:
    """data.columns against the source's columns: each mapped column must be there, and a mapped key must not also
    be a column (two values for one key)."""
    listed = ", ".join(have[:30]) + (", ..." if len(have) > 30 else "")
    for key, column in columns.items():
        if column not in have:
            raise DataError(f"{label.name}: data.columns maps '{key}' to the column '{column}', which the data does "
                            f"not have (its columns: {listed or 'none'}) -> name one of its columns in data.columns")
        if key in have and key not in columns.values():
            raise DataError(f"{label.name}: data.columns maps the column '{column}' to '{key}', but the data also "
                            f"has a column '{key}' -> remove that mapping, or the column '{key}'")


def _jsonl_line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"


_NARROW_FLOATS = {"float": np.float32, "halffloat": np.float16}  # arrow's names for float32, float16


def _typed(typ: Any) -> bool:
    """Whether a column's values need its arrow type to be written (a float32 or a map in it): the others go the
    faster way without."""
    import pyarrow.types as pat

    if pat.is_float32(typ) or pat.is_float16(typ) or pat.is_map(typ) or pat.is_dictionary(typ):
        return True
    return any(_typed(typ.field(i).type) for i in range(typ.num_fields))


def _is(typ: Any, test: str) -> bool:
    if typ is None:
        return False
    import pyarrow.types as pat  # imported by then: the rows came from pyarrow

    return getattr(pat, test)(typ)


class _NotJson(Exception):
    """A value with no JSON form; its message says what it holds."""


def _json_value(value: Any, typ: Any = None) -> Any:
    """``value`` as JSON holds it; ``typ``, the arrow type it came as (when known), tells a float32's shortest
    decimal and a map's pairs."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if _is(typ, "is_dictionary"):  # a dictionary-encoded column: its values' type
        typ = typ.value_type
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJson(f"holds {value} (JSON has no NaN or infinity)")
        narrow = _NARROW_FLOATS.get(str(typ)) if typ is not None else None
        return float(str(narrow(value))) if narrow else value  # str(np.float32(x)) is its shortest decimal
    if isinstance(value, dict):
        fields = {f.name: f.type for f in typ} if _is(typ, "is_struct") else {}
        converted = ((str(k), _json_value(v, fields.get(k))) for k, v in value.items())
        return {k: v for k, v in converted if v is not None}
    if _is(typ, "is_map") and isinstance(value, list):  # arrow gives a map as (key, item) pairs
        obj: dict[str, Any] = {}
        for k, v in value:
            k = _json_value(k, typ.key_type)
            if str(k) in obj:
                raise _NotJson(f"holds a map with the key {k!r} twice")
            obj[str(k)] = _json_value(v, typ.item_type)
        return {k: v for k, v in obj.items() if v is not None}
    if isinstance(value, (list, tuple)):
        item = getattr(typ, "value_type", None) if typ is not None else None
        return [_json_value(v, item) for v in value]
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, np.ndarray):
        return _json_value(value.tolist())
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise _NotJson("holds binary data that is not UTF-8 text (an image or audio?)") from None
    raise _NotJson(f"holds a {type(value).__name__} value")
