"""Reading an offline W&B run back from its ``.wandb`` file: a LevelDB-style log of protobuf records."""

import json
import re
import zlib

import pytest
from wandb.proto import wandb_internal_pb2

from lightning_geco.wandb_records import (
    _BLOCK_SIZE,
    _CHUNK_HEADER,
    _FIRST,
    _FULL,
    _HEADER,
    _LAST,
    _MIDDLE,
    read_history,
    read_records,
    wandb_file,
)


def _log_file(payloads: list[bytes]) -> tuple[bytes, list[int], list[int]]:
    """A ``.wandb`` file of ``payloads`` as LevelDB's log writer lays it out: (its bytes, the chunk
    types written, the lengths of the zero trailers that padded a block).

    Block boundaries count from the start of the file (the 7-byte header sits in block 0); a
    record goes in one FULL chunk where it fits, else FIRST, MIDDLE..., LAST; fewer than 7 bytes
    left in a block (no room for a chunk header) are zeros. The CRC is W&B's, crc32 of the type
    byte then the data (a real run's file checks with it).
    """
    out = bytearray(_HEADER.pack(b":W&B", 0xBEE1, 0))
    kinds: list[int] = []
    trailers: list[int] = []
    for payload in payloads:
        first = True
        while True:
            left = _BLOCK_SIZE - len(out) % _BLOCK_SIZE
            if left < _CHUNK_HEADER.size:
                out += bytes(left)
                trailers.append(left)
                continue
            piece, payload = payload[: left - _CHUNK_HEADER.size], payload[left - _CHUNK_HEADER.size :]
            last = not payload
            kind = _FULL if first and last else _FIRST if first else _LAST if last else _MIDDLE
            crc = zlib.crc32(piece, zlib.crc32(bytes([kind])))
            out += _CHUNK_HEADER.pack(crc, len(piece), kind) + piece
            kinds.append(kind)
            first = False
            if last:
                break
    return bytes(out), kinds, trailers


def _history_record(row: dict, nested: str = "whole") -> wandb_internal_pb2.Record:
    """A history record as W&B writes one: each key whole in ``nested_key`` and the value in
    ``value_json`` (``nested="split"``: the key's parts, as of a nested dict; ``"no"``: ``key``)."""
    record = wandb_internal_pb2.Record()
    for key, value in row.items():
        item = record.history.item.add()
        if nested == "no":
            item.key = key
        else:
            item.nested_key.extend([key] if nested == "whole" else key.split("/"))
        item.value_json = json.dumps(value)
    return record


def _output_record(size: int) -> wandb_internal_pb2.Record:
    """A non-history record whose serialized size is exactly ``size`` bytes."""
    for length in range(size, 0, -1):
        record = wandb_internal_pb2.Record()
        record.output_raw.line = "x" * length
        if record.ByteSize() == size:
            return record
    raise AssertionError(f"no output record of {size} bytes")


def test_records_across_blocks_and_block_trailers_read_back_exactly(tmp_path):
    small = {"trainer/global_step": 3, "geco/lambda": 3.8011703491210938, "epoch": 0}
    # A history row of ~70 KB: more than two 32 KiB blocks, so a FIRST, a MIDDLE and a LAST chunk.
    large = {"trainer/global_step": 4, "val/samples/filenames": ["media/" + "a" * 70_000 + ".png"], "flag": True}
    after_padding = {"trainer/global_step": 5, "val/distortion": 0.0722, "none": None}
    legacy = {"val/rate": 0.00246}
    records = [_history_record(small), _history_record(large)]
    head, _, _ = _log_file([r.SerializeToString() for r in records])
    # A record that leaves 3 bytes of its block: too few for a chunk header, so they are padding
    # and the next record starts the next block.
    filler_size = _BLOCK_SIZE - len(head) % _BLOCK_SIZE - _CHUNK_HEADER.size - 3
    records += [
        _output_record(filler_size),
        _history_record(after_padding, nested="split"),  # val/distortion as ["val", "distortion"]
        _history_record(legacy, nested="no"),
    ]
    data, kinds, trailers = _log_file([r.SerializeToString() for r in records])
    # The file holds what the test is about (else the writer above went wrong, not the reader).
    assert kinds == [_FULL, _FIRST, _MIDDLE, _LAST, _FULL, _FULL, _FULL]
    assert trailers == [3]
    path = tmp_path / "offline-run-20261127_100000-abc123" / "run-abc123.wandb"
    path.parent.mkdir()
    path.write_bytes(data)
    assert wandb_file(path.parent) == path

    assert list(read_records(path)) == records
    assert list(read_records(path.parent)) == records  # a run folder reads its .wandb file
    assert read_history(path) == [small, large, after_padding, legacy]  # the output record is no row
    # A file still being written ends in zeros W&B preallocated: the rows so far, no error.
    path.write_bytes(data + bytes(100))
    assert read_history(path) == [small, large, after_padding, legacy]
    # A file cut mid-record (a run killed while writing): the records written whole, no error.
    # (Cut inside the last record, it raised protobuf's DecodeError: "Wire format was corrupt".)
    path.write_bytes(data[:-5])
    assert read_history(path) == [small, large, after_padding]
    path.write_bytes(data[: len(head) - 100])  # inside the large record's LAST chunk
    assert read_history(path) == [small]


def test_a_file_that_is_not_a_wandb_log_is_refused_naming_its_header(tmp_path):
    path = tmp_path / "run-abc123.wandb"
    for header, message in [
        (b"PK\x03\x04\x14\x00\x00", r"Not a W&B run file (header b'PK\x03\x04', magic 0x14, version 0)."),
        (_HEADER.pack(b":W&B", 0xBEE1, 1), "Not a W&B run file (header b':W&B', magic 0xbee1, version 1)."),
        (_HEADER.pack(b":W&B", 0xBEE2, 0), "Not a W&B run file (header b':W&B', magic 0xbee2, version 0)."),
    ]:
        path.write_bytes(header + _log_file([_history_record({"a": 1}).SerializeToString()])[0][_HEADER.size :])
        with pytest.raises(ValueError) as error:
            read_history(path)
        assert str(error.value) == message


def test_a_folder_without_a_wandb_file_is_named(tmp_path):
    (tmp_path / "files").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"No run-*.wandb file in {tmp_path}; is it a W&B run folder?")):
        read_history(tmp_path)


def test_a_file_whose_header_is_not_yet_written_holds_no_records(tmp_path):
    # W&B's service creates the file before it writes; a reader polling it then sees no rows.
    for partial in (b"", b":W&B"):
        path = tmp_path / "run-new.wandb"
        path.write_bytes(partial)
        assert list(read_records(path)) == [] and read_history(tmp_path) == []
