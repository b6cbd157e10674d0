"""prepare's inputs read as a stream of records: memory holds a bounded number of them (a chunk
of JSON lines, one text document) at a time, whatever the corpus size.

Input kinds, by file name (a trailing ``.gz`` is read through gzip first):

* ``*.jsonl``, ``*.json``: one JSON object per line (Megatron's loose JSON); each ``--json-keys``
  key's string value is a document of that key's dataset, kept exactly as given (an empty string
  is no document).  Blank lines are ignored.
* anything else: UTF-8 text, one document per file or, with ``--split-paragraphs``, per block of
  lines between blank lines; documents are stripped of surrounding whitespace, a BOM and CRLF
  line ends.  A file whose first 64 KiB holds a NUL byte or is mostly not UTF-8 is binary, and is
  skipped with a warning like an empty one.

A *record* is one document of a text file or one JSON line.  Records are numbered 0, 1, 2, ... in
input order over all files (bad records skipped under ``--errors skip`` and empty text documents
get no number); ``in_val`` decides each record's split from that ordinal alone.

Bad records (invalid JSON, not an object, a missing key or a non-string value, bytes that are not
UTF-8, lone surrogates) are reported as ``FILE:LINE: reason``.  ``--errors stop`` (``strict``)
ends the run with that line; ``skip`` warns and drops the record; ``replace`` substitutes U+FFFD
for undecodable text and stops on the other kinds.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

from tqdm import tqdm

# A file whose first 64 KiB has more than 10% non-UTF-8 bytes is binary, not text with a few
# stray bytes (which gets the precise "invalid UTF-8 at byte offset" error instead).
BINARY_SNIFF_BYTES = 65536
BINARY_INVALID_FRACTION = 0.1
JSON_SUFFIXES = (".jsonl", ".json")
JSON_CHUNK_BYTES = 1 << 16  # JSON lines travel to the parser (a worker) in chunks of about this size
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# sentencepiece's trainer ignores longer sentences (its max_sentence_length, in bytes): not worth sampling.
MAX_TRAINING_LINE_CHARS = 4192


class DataError(Exception):
    """Bad input or output location: reported as one line on stderr, exit code 2."""


def warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)  # above a running progress bar, not through it


def in_val(ordinal: int, seed: int, val_fraction: float) -> bool:
    """Record ``ordinal`` goes to val when the seeded uniform draw
    ``int.from_bytes(blake2b(f"{seed}:{ordinal}", digest_size=8), "big") / 2**64`` is below
    ``val_fraction``: decidable per record, without knowing how many there are."""
    digest = hashlib.blake2b(f"{seed}:{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64 < val_fraction


def collect_files(inputs: list[str], pattern: str) -> list[Path]:
    """Explicit files as given; directories searched recursively for ``pattern``, sorted."""
    files, seen = [], set()
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"input path does not exist: {raw}")
        found = sorted(p for p in path.rglob(pattern) if p.is_file()) if path.is_dir() else [path]
        for p in found:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    if not files:
        raise DataError(f"no files matching {pattern!r} found in: {' '.join(inputs)}")
    return files


def is_json_input(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    return name.endswith(JSON_SUFFIXES)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _lines(head: bytes, f: BinaryIO) -> Iterator[bytes]:
    """The lines (with their b"\\n") of ``head`` followed by the rest of ``f``."""
    pieces = head.split(b"\n")
    for piece in pieces[:-1]:
        yield piece + b"\n"
    last = pieces[-1] + f.readline()  # completes the line the sniffed head cut, if any
    if last:
        yield last
    yield from f


class BadRecord(NamedTuple):
    """Why a record is bad, and what would let the run go on."""

    reason: str
    hint: str = "pass --errors skip to drop such records"


UTF8_HINT = "pass --errors replace to substitute U+FFFD or --errors skip to drop the record"
# A unit is records as read, before parsing: (file index, line number of its first line, byte offset of
# that line, payload); the payload is a chunk of JSON lines (list of bytes, parsed by parse_unit,
# possibly in a worker process), one text document (str, ready), or a BadRecord found while reading.
Unit = tuple[int, int, int, "list[bytes] | str | BadRecord"]
# Parsed records: (file index, line number, documents one per key or BadRecord, offset of a byte
# replaced with U+FFFD or None).
Parsed = tuple[int, int, "list[str | None] | BadRecord", "int | None"]


def _decode(raw: bytes, offset: int, errors: str) -> tuple[str | BadRecord, int | None]:
    """(text or BadRecord, file offset of the first byte replaced with U+FFFD, if any)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        if errors == "replace":
            return raw.decode("utf-8", "replace"), offset + e.start
        return BadRecord(f"invalid UTF-8 at byte offset {offset + e.start} (byte 0x{raw[e.start]:02x})",
                         UTF8_HINT), None


def _json_documents(line: str, keys: list[str], errors: str) -> list[str | None] | BadRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return BadRecord(f"invalid JSON ({e.msg} at column {e.colno})")
    if not isinstance(obj, dict):
        return BadRecord(f"not a JSON object (a {type(obj).__name__})")
    texts = []
    for key in keys:
        if key not in obj:
            shown = ", ".join(list(obj)[:5]) + (", ..." if len(obj) > 5 else "")
            return BadRecord(f"no key {key!r} (keys: {shown or 'none'})")
        text = obj[key]
        if not isinstance(text, str):
            return BadRecord(f"key {key!r} holds a {type(text).__name__}, not a string")
        if "\\u" in line and LONE_SURROGATE.search(text):  # escapes are the only way JSON text gets them
            if errors != "replace":
                return BadRecord(f"key {key!r} holds a lone surrogate (not valid Unicode)", UTF8_HINT)
            text = LONE_SURROGATE.sub("\ufffd", text)
        texts.append(text or None)  # an empty string is no document
    return texts


def unit_size(unit: Unit) -> int:
    payload = unit[3]
    return sum(map(len, payload)) if isinstance(payload, list) else len(payload) if isinstance(payload, str) else 0


def parse_unit(unit: Unit, keys: list[str], errors: str) -> list[Parsed]:
    """The unit's records, parsed; pure, so that worker processes can run it."""
    file_index, lineno, offset, payload = unit
    if not isinstance(payload, list):
        return [(file_index, lineno, [payload] if isinstance(payload, str) else payload, None)]
    records = []
    for number, raw in enumerate(payload, lineno):
        start, offset = offset, offset + len(raw)
        line, replaced = _decode(raw, start, errors)
        if isinstance(line, str):
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue  # blank lines are no records
            line = _json_documents(line, keys, errors)
        records.append((file_index, number, line, replaced))
    return records


@dataclass
class InputReader:
    """The inputs as ``units()`` (records as read) and, through ``accept`` applying ``--errors`` in input
    order, numbered records; ``records()`` does both in this process.

    ``skipped_files`` (binary / empty, with the reason), ``bad_records`` (skipped under
    ``--errors skip``) and ``replaced`` (per file: lines with U+FFFD, first line and offset) count
    what was left out or changed; ``report=False`` reads silently (a first pass)."""

    files: list[Path]
    keys: list[str]
    split_paragraphs: bool
    errors: str  # stop | skip | replace
    report: bool = True
    skipped_files: list[dict] = field(default_factory=list)
    bad_records: int = 0
    replaced: dict[int, list[int]] = field(default_factory=dict)
    num_records: int = 0
    _used_files: set[int] = field(default_factory=set)

    @property
    def files_used(self) -> int:
        return len(self._used_files)

    def units(self) -> Iterator[Unit]:
        for index, path in enumerate(self.files):
            read = self._json_units if is_json_input(path) else self._text_units
            try:
                with _open(path) as f:
                    yield from read(index, path, f)
            except (OSError, EOFError, zlib.error) as e:  # unreadable, not gzip, a truncated stream
                reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
                raise DataError(f"cannot read {path}: {reason}") from None

    def accept(self, file_index: int, lineno: int, result, replaced: int | None) -> int | None:
        """The record's ordinal, or None for a bad one: raised as DataError unless --errors skip,
        where it is counted (and warned about)."""
        if replaced is not None:
            self._note_replaced(file_index, lineno, replaced)
        if isinstance(result, BadRecord):
            where = f"{self.files[file_index]}:{lineno}: {result.reason}"
            if self.errors != "skip":
                raise DataError(f"{where}; {result.hint}")
            self.bad_records += 1
            if self.report:
                warn(f"{where}; record skipped")
            return None
        self._used_files.add(file_index)
        self.num_records += 1
        return self.num_records - 1

    def records(self) -> Iterator[tuple[int, list[str | None]]]:
        """``(ordinal, texts)`` per good record, one text per key (None: no document for that key)."""
        for unit in self.units():
            for file_index, lineno, result, replaced in parse_unit(unit, self.keys, self.errors):
                ordinal = self.accept(file_index, lineno, result, replaced)
                if ordinal is not None:
                    yield ordinal, result

    def report_replaced(self) -> None:
        for index, (count, line, offset) in self.replaced.items():
            warn(f"{self.files[index]}: invalid UTF-8 on {count} line(s) replaced with U+FFFD "
                 f"(first: line {line}, byte offset {offset})")

    def _note_replaced(self, file_index: int, lineno: int, offset: int) -> None:
        self.replaced.setdefault(file_index, [0, lineno, offset])[0] += 1

    def _skip_file(self, path: Path, reason: str) -> None:
        self.skipped_files.append({"path": str(path), "reason": reason})

    def _json_units(self, index: int, path: Path, f: BinaryIO) -> Iterator[Unit]:
        lineno, offset, any_line = 1, 0, False
        while lines := f.readlines(JSON_CHUNK_BYTES):
            # Only to tell an empty file: a line of whitespace (or a BOM) is no record.
            any_line = any_line or any(line.strip(b" \t\r\n\xef\xbb\xbf") for line in lines)
            yield index, lineno, offset, lines
            lineno, offset = lineno + len(lines), offset + sum(map(len, lines))
        if not any_line:
            self._skip_file(path, "empty file")

    def _text_units(self, index: int, path: Path, f: BinaryIO) -> Iterator[Unit]:
        head = f.read(BINARY_SNIFF_BYTES)
        nul = head.find(b"\x00")
        invalid = len(head) - len(head.decode("utf-8", "ignore").encode("utf-8"))
        if nul >= 0:
            return self._skip_file(path, f"binary file (NUL byte at offset {nul})")
        if invalid > BINARY_INVALID_FRACTION * len(head):
            return self._skip_file(path, f"binary file ({invalid} of the first {len(head)} bytes are not UTF-8)")
        offset, any_record = 0, False
        block, block_line, bad = [], 1, None
        for lineno, raw in enumerate(_lines(head, f), 1):
            start, offset = offset, offset + len(raw)
            line, replaced = _decode(raw, start, self.errors)
            if replaced is not None:
                self._note_replaced(index, lineno, replaced)
            if isinstance(line, BadRecord):
                bad = bad or (index, lineno, start, line)  # the document holding it is the bad record
                continue
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
            if self.split_paragraphs and not line.strip(" \t\r\n"):
                unit = bad or (index, block_line, -1, "".join(block).strip())
                if unit[3]:
                    any_record = True
                    yield unit
                block, block_line, bad = [], lineno + 1, None
            else:
                block.append(line)
        unit = bad or (index, block_line, -1, "".join(block).strip())
        if unit[3]:
            any_record = True
            yield unit
        if not any_record:
            self._skip_file(path, "empty file")


def sample_training_lines(records, seed: int, val_fraction: float, max_lines: int) -> tuple[list[str], int]:
    """A seeded reservoir sample of at most ``max_lines`` non-blank lines of the training
    ``records`` (``InputReader.records()``; every key's text), in one pass; returns it with the
    number of records read."""
    rng = random.Random(seed)
    sample, seen, num_records = [], 0, 0
    for ordinal, texts in records:
        num_records += 1
        if in_val(ordinal, seed, val_fraction):
            continue
        for text in texts:
            for line in (text or "").split("\n"):
                if not line.strip() or len(line) > MAX_TRAINING_LINE_CHARS:
                    continue
                if seen < max_lines:
                    sample.append(line)
                else:
                    j = rng.randrange(seen + 1)
                    if j < max_lines:
                        sample[j] = line
                seen += 1
    return sample, num_records
