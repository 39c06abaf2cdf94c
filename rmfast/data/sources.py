"""Reading preference rows from files, folders, `datasets` directories and hub names.

Every row comes with a location a person can open: ``file:line`` for JSON Lines, JSON and CSV,
``file:row N`` for Parquet and ``dir#row N`` for a `datasets` directory. A row that cannot be read
(malformed JSON, undecodable bytes, not an object) comes back with its reason instead of its data,
and an empty file yields one such row, so that nothing is lost without a word."""

import csv
import gzip
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from ..errors import UserError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class RawRow:
    location: str
    data: Optional[dict]
    reason: Optional[str] = None  # a reason code from rmfast.data.formats.REASONS
    detail: str = ""


def _kind(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _is_datasets_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (
        path / "state.json").exists()


_told = set()


def files_of(source: str):
    """The data files a path names (a folder: its supported files, recursively, in sorted order)."""
    path = Path(source)
    if path.is_dir():
        every = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
        files = sorted(p for p in every if _kind(p))
        if not files:
            raise FileNotFoundError(f"{source}: folder holds no {', '.join(FILE_SUFFIXES)} files")
        others = sorted(p.name for p in every if not _kind(p))
        if others and str(path) not in _told:  # once per folder, however often it is listed
            _told.add(str(path))
            print(f"rmfast: {source}: skipping {len(others)} file(s) that are not data ({', '.join(others[:3])}"
                  f"{', …' if len(others) > 3 else ''})", file=sys.stderr)
        return files
    if _kind(path) is None:
        raise UserError(f"{source}: unsupported file type; use {', '.join(FILE_SUFFIXES)} (optionally .gz), "
                        f"a folder of them, a `datasets` directory or a hub dataset name")
    return [path]


def fingerprint(source: str, split: str = "train") -> str:
    """What identifies a source's content for the tokenization cache: path, size and mtime of each file
    (a hub name by its name, split, configuration and revision)."""
    path = Path(source)
    if not path.exists():
        if "?" not in source:  # as recorded before the options existed (the cache and resume checks keep it)
            return f"hub:{source}:{split}"
        repo, options = hub_spec(source, split)
        return f"hub:{repo}:" + ":".join(f"{k}={options[k]}" for k in HUB_OPTIONS)
    files = [p for p in path.rglob("*") if p.is_file()] if _is_datasets_dir(path) else files_of(source)
    parts = []
    for p in sorted(files):
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def iter_rows(source: str, split: str = "train") -> Iterator[RawRow]:
    """Rows of one source: a file, a folder of files, a `datasets` directory, or a hub dataset name."""
    path = Path(source)
    if path.is_dir() and _is_datasets_dir(path):
        yield from _iter_datasets_dir(path, split)
        return
    if not path.exists():
        if is_hub_name(source):
            yield from _iter_hub(source, split)
            return
        raise FileNotFoundError(f"{source}: no such file or folder (and not a hub dataset name like org/name, "
                                f"or org/name?split=test&name=CONFIG&revision=REV)")
    for file in files_of(source):
        yield from _READERS[_kind(file)](file)


_BROKEN = (EOFError, zlib.error, gzip.BadGzipFile)  # a cut or corrupt compressed file


def _lines(path: Path):
    """(line number, text or None, reason, error detail) for each line, decoding each line on its own; a
    file that breaks off ends with one "truncated" line (the lines before it are good)."""
    number = 0
    with _open_bytes(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                try:
                    yield number, raw.decode("utf-8"), None, ""
                except UnicodeDecodeError as exc:
                    yield number, None, "undecodable", f"invalid UTF-8 at byte {exc.start}"
        except _BROKEN as exc:
            yield number + 1, None, "truncated", f"the file breaks off after line {number} ({exc})"


def _read_jsonl(path: Path):
    seen = False
    for number, text, reason, error in _lines(path):
        location = f"{path}:{number}"
        if text is None:
            seen = True
            yield RawRow(location, None, reason, error)
            continue
        if not text.strip():
            continue
        seen = True
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(location, None, "malformed_json", exc.msg + f" (column {exc.colno})")
            continue
        if not isinstance(data, dict):
            yield RawRow(location, None, "not_object", f"got a JSON {type(data).__name__}")
            continue
        yield RawRow(location, data)
    if not seen:
        yield RawRow(f"{path}:0", None, "empty_file", "the file holds no rows")


def _read_json(path: Path):
    try:
        with _open_bytes(path) as f:
            raw = f.read()
    except _BROKEN as exc:
        yield RawRow(f"{path}:0", None, "truncated", f"the file breaks off ({exc})")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        yield RawRow(f"{path}:{line}", None, "undecodable", f"invalid UTF-8 at byte {exc.start}")
        return
    if not text.strip():
        yield RawRow(f"{path}:0", None, "empty_file", "the file holds no rows")
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if text.startswith("{", pos):  # {"data": [...]}: an object holding one array of rows
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRow(f"{path}:{exc.lineno}", None, "malformed_json", exc.msg)
            return
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            yield RawRow(f"{path}:1", None, "not_object", "expected an array of rows, or an object holding one")
            return
        if not lists[0]:
            yield RawRow(f"{path}:0", None, "empty_file", "the JSON array is empty")
        for i, item in enumerate(lists[0], start=1):
            yield _json_item(f"{path}:item {i}", item)
        return
    if not text.startswith("[", pos):
        yield RawRow(f"{path}:1", None, "malformed_json", "expected a JSON array of row objects")
        return
    pos += 1
    count = 0
    while True:
        pos = _skip_ws(text, pos)
        if text.startswith("]", pos):
            break
        line = text.count("\n", 0, pos) + 1
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield RawRow(f"{path}:{exc.lineno}", None, "malformed_json", exc.msg)
            return  # the rest of the array cannot be located reliably
        count += 1
        yield _json_item(f"{path}:{line}", item)
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            yield RawRow(f"{path}:{text.count(chr(10), 0, pos) + 1}", None, "malformed_json",
                         "expected ',' or ']' after a row")
            return
    if count == 0:
        yield RawRow(f"{path}:0", None, "empty_file", "the JSON array is empty")


def _skip_ws(text, pos):
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_item(location, item):
    if not isinstance(item, dict):
        return RawRow(location, None, "not_object", f"got a JSON {type(item).__name__}")
    return RawRow(location, item)


def _read_csv(path: Path):
    bad_lines = {}

    def text_lines():
        for number, text, _, error in _lines(path):
            if text is None:
                bad_lines[number] = error
                yield ""
            else:
                yield text

    reader = csv.DictReader(text_lines())
    seen = False
    start = 2
    for record in reader:
        seen = True
        location = f"{path}:{start}"
        end = reader.line_num
        errors = [bad_lines[n] for n in range(start, end + 1) if n in bad_lines]
        start = end + 1
        if errors:
            yield RawRow(location, None, "undecodable", errors[0])
            continue
        if None in record:
            yield RawRow(location, None, "malformed_csv", "more fields than the header names")
            continue
        yield RawRow(location, dict(record))
    if not seen:
        yield RawRow(f"{path}:0", None, "empty_file", "the file holds no rows")


def _read_parquet(path: Path, batch_rows=8192):
    """Rows of a Parquet file, read batch_rows at a time (never the whole table in memory at once)."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as f:
        if f.metadata.num_rows == 0:
            yield RawRow(f"{path}:0", None, "empty_file", "the file holds no rows")
            return
        i = 0
        for batch in f.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                i += 1
                yield RawRow(f"{path}:row {i}", row)


def _iter_datasets_dir(path: Path, split: str):
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    if len(ds) == 0:
        yield RawRow(f"{path}#row 0", None, "empty_file", "the dataset holds no rows")
    for i, row in enumerate(ds, start=1):
        yield RawRow(f"{path}#row {i}", row)


HUB_OPTIONS = ("split", "name", "revision")


def is_hub_name(source: str) -> bool:
    name = source.split("?", 1)[0]
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def hub_spec(source: str, split: str = "train"):
    """A hub dataset by its full name: 'org/name', or 'org/name?split=test&name=CONFIG&revision=REV' (the
    split, the configuration and a git revision of the dataset repository). Returns (repo, {split, name,
    revision}); the split defaults to `split`."""
    from urllib.parse import parse_qsl

    repo, _, query = source.partition("?")
    options = {"split": split, "name": None, "revision": None}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key not in HUB_OPTIONS:
            raise UserError(f"{source}: unknown option {key!r}; a hub name takes {', '.join(HUB_OPTIONS)} "
                            f"(org/name?split=test&name=CONFIG&revision=REV)")
        options[key] = value
    return repo, options


def _iter_hub(source: str, split: str):
    import datasets

    repo, options = hub_spec(source, split)
    try:
        ds = datasets.load_dataset(repo, **options)
    except Exception as exc:
        raise RuntimeError(f"{source}: could not load it from the hub ({type(exc).__name__}: {exc}). "
                           f"Without a network, download it elsewhere and pass the local folder.") from exc
    for i, row in enumerate(ds, start=1):
        yield RawRow(f"{repo}[{options['split']}]#row {i}", row)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
