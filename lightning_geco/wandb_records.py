"""Read back an offline W&B run from its ``.wandb`` file, without network or account.

The file is a LevelDB-style log (header ``:W&B``, magic 0xBEE1, version 0; 32 KiB blocks of
chunks ``crc32 (4) | length (2) | type (1) | data``) of protobuf ``Record`` messages. Used by
the tests to check what a run logged, and by tools that compare finished runs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_history", "read_records", "wandb_file"]

_BLOCK_SIZE = 32 * 1024
_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_file(run_dir: str | Path) -> Path:
    """The ``run-*.wandb`` file of a W&B run folder (``.../offline-run-DATE-ID``)."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"No run-*.wandb file in {run_dir}; is it a W&B run folder?")
    return files[0]


def _payloads(data: bytes) -> Iterator[bytes]:
    if len(data) < _HEADER.size:
        return  # a file W&B has just created, its header not yet written: no records yet
    ident, magic, version = _HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"Not a W&B run file (header {ident!r}, magic {magic:#x}, version {version}).")
    offset, pending = _HEADER.size, b""
    while offset + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER.size:
            offset += left_in_block  # block trailer padding
            continue
        _, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        offset += _CHUNK_HEADER.size
        if offset + length > len(data):
            break  # a file cut mid-record (a process killed while writing it): the records before it
        chunk = data[offset : offset + length]
        offset += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of a file still being written
            break


def read_records(path: str | Path) -> Iterator[Any]:
    """Every protobuf ``Record`` in a ``.wandb`` file (or the run folder holding one); of a file
    cut short (a run killed while it wrote), the records written whole."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    if path.is_dir():
        path = wandb_file(path)
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated protobuf, no stub
        record.ParseFromString(payload)
        yield record


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The run's history rows (one dict per ``wandb.log`` step), values decoded from JSON."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows
