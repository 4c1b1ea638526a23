"""The content hash: SHA-256 over the SHA-256 digests of 8 MiB blocks, however bytes arrive."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from assets.hashing import BLOCK_BYTES, TreeHasher, combine_block_digests, content_hash_of_file

EMPTY_CONTENT_HASH = "5df6e0e2761359d30a8275058e299fcc0381534545f55cf43e41983f5d4c9456"


def pseudo_random(size: int, seed: str = "kshipra") -> bytes:
    """Deterministic, incompressible-looking bytes (SHA-512 in counter mode)."""
    out = bytearray()
    counter = 0
    seed_bytes = seed.encode()
    while len(out) < size:
        out += hashlib.sha512(seed_bytes + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


SMALL = pseudo_random(100_003)
# Crosses the 8 MiB block boundary by a few KiB: two blocks.
LARGE = pseudo_random(BLOCK_BYTES + 12_345, seed="large")


def reference_hash(data: bytes) -> str:
    """The definition, written independently of TreeHasher: split into 8 MiB blocks, hash
    each, hash the concatenated digests. An empty file is one empty block."""
    blocks = [data[i : i + BLOCK_BYTES] for i in range(0, len(data), BLOCK_BYTES)] or [b""]
    return hashlib.sha256(b"".join(hashlib.sha256(block).digest() for block in blocks)).hexdigest()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def tree_hash(pieces: Iterator[bytes] | list[bytes]) -> TreeHasher:
    hasher = TreeHasher()
    for piece in pieces:
        hasher.update(piece)
    return hasher


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4093, 65_536, 100_003, 1 << 20])
def test_chunking_does_not_change_the_hash_of_a_small_file(chunk_bytes: int) -> None:
    data = SMALL[:10_007] if chunk_bytes == 1 else SMALL
    hasher = tree_hash(chunks(data, chunk_bytes))
    assert hasher.hexdigest() == reference_hash(data)
    assert hasher.size_bytes == len(data)


@pytest.mark.parametrize(
    "chunk_bytes",
    [999_983, 1 << 20, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, len(LARGE)],
    ids=["odd-prime", "1MiB", "block-minus-1", "block", "block-plus-1", "whole"],
)
def test_chunking_does_not_change_the_hash_across_a_block_boundary(chunk_bytes: int) -> None:
    hasher = tree_hash(chunks(LARGE, chunk_bytes))
    assert hasher.hexdigest() == reference_hash(LARGE)
    assert hasher.size_bytes == len(LARGE)
    assert len(hasher.block_digests()) == 2


def test_memoryview_input_hashes_like_bytes() -> None:
    hasher = TreeHasher()
    hasher.update(memoryview(SMALL)[:50_000])
    hasher.update(memoryview(bytearray(SMALL[50_000:])))
    assert hasher.hexdigest() == reference_hash(SMALL)


@pytest.mark.parametrize(
    ("size", "blocks"),
    [
        (0, 1),
        (1, 1),
        (BLOCK_BYTES - 1, 1),
        (BLOCK_BYTES, 1),
        (BLOCK_BYTES + 1, 2),
        (2 * BLOCK_BYTES, 2),
    ],
)
def test_equals_combine_of_per_block_digests(size: int, blocks: int) -> None:
    data = b"\x5a" * size
    hasher = tree_hash([data])
    per_block = [
        hashlib.sha256(data[i : i + BLOCK_BYTES]).digest() for i in range(0, size, BLOCK_BYTES)
    ] or [hashlib.sha256(b"").digest()]
    assert hasher.block_digests() == per_block
    assert len(per_block) == blocks
    assert hasher.hexdigest() == combine_block_digests(per_block)
    assert hasher.hexdigest() == reference_hash(data)


def test_combine_block_digests_accepts_any_iterable() -> None:
    digests = [hashlib.sha256(b"part-1").digest(), hashlib.sha256(b"part-2").digest()]
    expected = hashlib.sha256(digests[0] + digests[1]).hexdigest()
    assert combine_block_digests(iter(digests)) == expected
    assert combine_block_digests(digests) == expected


def test_empty_input_has_a_defined_hash() -> None:
    hasher = TreeHasher()
    assert hasher.size_bytes == 0
    assert hasher.hexdigest() == hashlib.sha256(hashlib.sha256(b"").digest()).hexdigest()
    assert hasher.hexdigest() == EMPTY_CONTENT_HASH
    hasher.update(b"")
    assert hasher.hexdigest() == EMPTY_CONTENT_HASH


A_BLOCK = b"\x01" * BLOCK_BYTES
B_BLOCK = b"\x02" * BLOCK_BYTES


@pytest.mark.parametrize(
    ("left", "right"),
    [
        pytest.param(b"a", b"b", id="one-byte"),
        pytest.param(b"", b"\x00", id="empty-vs-zero-byte"),
        pytest.param(SMALL, SMALL + b"\x00", id="trailing-zero"),
        pytest.param(SMALL, SMALL[:-1] + bytes([SMALL[-1] ^ 1]), id="last-bit-flipped"),
        pytest.param(LARGE, LARGE[:-1], id="large-truncated"),
        pytest.param(A_BLOCK + B_BLOCK, B_BLOCK + A_BLOCK, id="blocks-swapped"),
    ],
)
def test_different_content_has_a_different_hash(left: bytes, right: bytes) -> None:
    assert tree_hash([left]).hexdigest() != tree_hash([right]).hexdigest()


def test_reading_the_digest_midway_does_not_disturb_the_result() -> None:
    hasher = TreeHasher()
    hasher.update(LARGE[: BLOCK_BYTES - 5])
    midway = hasher.hexdigest()
    hasher.update(LARGE[BLOCK_BYTES - 5 :])
    assert midway == reference_hash(LARGE[: BLOCK_BYTES - 5])
    assert hasher.hexdigest() == reference_hash(LARGE)


@pytest.mark.parametrize(
    ("data", "chunk_bytes"),
    [
        pytest.param(b"", 1024 * 1024, id="empty"),
        pytest.param(b"x", 1024 * 1024, id="one-byte"),
        pytest.param(SMALL, 1, id="small-read-1"),
        pytest.param(SMALL, 4096, id="small-read-4096"),
        pytest.param(LARGE, 1024 * 1024, id="two-blocks-default"),
        pytest.param(LARGE, 3_000_001, id="two-blocks-odd-reads"),
    ],
)
def test_content_hash_of_file(tmp_path: Path, data: bytes, chunk_bytes: int) -> None:
    if chunk_bytes == 1:
        data = data[:4096]
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    digest, size = content_hash_of_file(str(path), chunk_bytes=chunk_bytes)
    assert size == len(data)
    assert digest == tree_hash([data]).hexdigest()
    assert digest == reference_hash(data)


def test_content_hash_of_file_default_chunking(tmp_path: Path) -> None:
    path = tmp_path / "lecture.mp4"
    path.write_bytes(LARGE)
    assert content_hash_of_file(str(path)) == (reference_hash(LARGE), len(LARGE))
