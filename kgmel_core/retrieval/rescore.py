"""Exact re-scoring of a compressed index's shortlist against the full vectors, read row by row from disk.

IVF-PQ keeps a 10M-entity KB in a few GB, but its codes blur nearby vectors: the true top-16 is often
in its top few hundred and rarely in its top 16. Re-scoring a shortlist of `R` rows with the full
vectors restores the exact order inside it, and the vectors stay on disk: each shortlisted row is read
with a positioned read (`pread`) through the page cache, so the resident set holds the rows of one
query, never the KB. A memory mapping would not: each row it touches maps the neighbouring page-cache
pages as well (fault-around), so the resident set grows with every shortlist, by gigabytes at 10M.
Before a chunk's rows are read, the kernel is asked to read them ahead (`VectorRows.prefetch`): a file
outside the page cache (after a reboot, or larger than RAM) then costs many reads in flight, not one disk
round trip per row.

The vectors file is a standard `.npy` (its header holds dtype and shape), written shard by shard so
the matrix is never whole in memory. Opening it checks its size against the header (a truncated copy
is refused) and its shape against the index; `check_pairing` then asks the first pass for a few of the
file's own rows: a file from another build (same shape, other vectors) does not find itself.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}
SEARCH_CHUNK = 512  # queries per first-pass call when searching in a pipeline
PREFETCH_GAP = 1 << 16  # shortlisted rows closer than this are asked for as one range: one request, not two
PREFETCH_WINDOW = 1 << 17  # Linux reads at most its readahead window (often 128 KB) per WILLNEED call


class VectorsFileError(ValueError):
    """The vectors file cannot be trusted to re-score this index (truncated, other shape, other build)."""


def write_header(handle: BinaryIO, n: int, d: int, dtype: str) -> None:
    """Start a `.npy` file of shape (n, d); the rows follow with `write_rows`, in index order."""
    np.lib.format.write_array_header_1_0(
        handle, {"descr": np.lib.format.dtype_to_descr(DTYPES[dtype]), "fortran_order": False, "shape": (n, d)}
    )


def write_rows(handle: BinaryIO, vectors: np.ndarray, dtype: str) -> None:
    handle.write(np.ascontiguousarray(vectors, dtype=DTYPES[dtype]).tobytes())


def extend_vectors(source: Path | str, target: BinaryIO, n: int, d: int, added: int, dtype: str) -> None:
    """Start `target` as a copy of the checked (n, d) vectors file `source` with room for `added` more
    rows in its header; the new rows follow with `write_rows` (an artifact's files are never edited in
    place, so a grown index gets a grown copy)."""
    offset, found = checked_layout(source, n, d)
    if found != DTYPES[dtype]:
        raise VectorsFileError(f"{source}: holds {found} vectors, this index writes {dtype}")
    write_header(target, n + added, d, dtype)
    with open(source, "rb") as handle:
        handle.seek(offset)
        shutil.copyfileobj(handle, target, 1 << 24)


def checked_layout(path: Path | str, n: int, d: int) -> tuple[int, np.dtype]:
    """(offset of the first row, dtype) of an (n, d) vectors file, after checking header, size and shape."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(handle)
        except ValueError as exc:
            raise VectorsFileError(f"{path}: not a .npy vectors file ({exc})") from exc
        offset = handle.tell()
    if fortran or len(shape) != 2 or dtype not in DTYPES.values():
        raise VectorsFileError(f"{path}: holds {dtype} {shape}{' (Fortran order)' if fortran else ''}, "
                               f"expected a C-order float16/float32 matrix")
    if shape != (n, d):
        raise VectorsFileError(f"{path}: holds {shape[0]} x {shape[1]} vectors, the index {n} x {d}")
    expected, actual = offset + n * d * dtype.itemsize, os.path.getsize(path)
    if actual != expected:
        raise VectorsFileError(f"{path}: {actual} bytes, expected {expected} for {n} x {d} {dtype} "
                               f"({'truncated' if actual < expected else 'trailing bytes'})")
    return offset, dtype


def rows_in_order(path: Path | str, n: int, d: int, chunk: int = 1 << 16) -> Iterator[np.ndarray]:
    """The rows of a checked (n, d) vectors file front to back, `chunk` at a time, as float32: one
    sequential read, for building another index over the vectors an index was built from."""
    offset, dtype = checked_layout(path, n, d)
    with open(path, "rb") as handle:
        handle.seek(offset)
        for start in range(0, n, chunk):
            rows = np.empty((min(chunk, n - start), d), dtype)
            if handle.readinto(memoryview(rows).cast("B")) != rows.nbytes:
                raise VectorsFileError(f"{path}: rows from {start} could not be read whole (the file shrank)")
            yield rows.astype(np.float32)


class VectorRows:
    """Rows of a checked vectors file, read on demand with positioned reads: `rows_of[ids]` is the
    (len(ids), d) matrix of those rows, like fancy indexing of the array, without mapping the file."""

    def __init__(self, path: Path | str, n: int, d: int):
        self.path = Path(path)
        self.offset, self.dtype = checked_layout(path, n, d)
        self.row_bytes = d * self.dtype.itemsize
        self.d = d
        self.asked = np.zeros((self.offset + n * self.row_bytes) // PREFETCH_WINDOW + 1, bool)  # whole windows asked
        self.fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """One `pread` per row, joined once: the Python work per row, not the copy, is the cost here."""
        ids = np.asarray(ids, np.int64)
        offsets = (self.offset + ids * self.row_bytes).tolist()
        data = bytearray().join([os.pread(self.fd, self.row_bytes, offset) for offset in offsets])  # writable
        if len(data) != len(offsets) * self.row_bytes:
            short = next(row for row, offset in zip(ids.tolist(), offsets, strict=True)
                         if len(os.pread(self.fd, self.row_bytes, offset)) != self.row_bytes)
            raise VectorsFileError(f"{self.path}: row {short} could not be read whole (the file shrank)")
        return np.frombuffer(data, self.dtype).reshape(len(offsets), self.d)

    def prefetch(self, ids: np.ndarray) -> None:
        """Ask the kernel to start reading these rows now (`POSIX_FADV_WILLNEED`), so the `pread`s that
        follow find them in the page cache. A cold file otherwise costs one disk round trip per row, one
        at a time: far slower than the same bytes read ahead, many requests in flight. Nearby rows join
        into one range, cut at the kernel's readahead window (it reads nothing past one window a call); a
        whole window is asked for once per open file, so a warm file is not asked for again and again."""
        if not hasattr(os, "posix_fadvise"):  # macOS, Windows: the reads alone, as before
            return
        ids = np.sort(np.asarray(ids, np.int64), axis=None)
        ids = ids[ids >= 0]
        if not len(ids):
            return
        ids = ids[np.r_[True, ids[1:] != ids[:-1]]]  # not np.unique: 15x slower on a chunk's 131k rows
        starts = self.offset + ids * self.row_bytes
        ends = starts + self.row_bytes
        cuts = np.flatnonzero(starts[1:] - ends[:-1] > PREFETCH_GAP) + 1
        starts, ends = starts[np.r_[0, cuts]], ends[np.r_[cuts - 1, len(ends) - 1]]  # the joined ranges
        # Each range's windows, in numpy: a search of 10k queries at 1M meets ~12k a chunk, most asked before.
        first = starts // PREFETCH_WINDOW
        count = (ends - 1) // PREFETCH_WINDOW - first + 1
        range_of = np.repeat(np.arange(len(starts)), count)
        window = first[range_of] + np.arange(len(range_of)) - np.repeat(np.cumsum(count) - count, count)
        low = np.maximum(starts[range_of], window * PREFETCH_WINDOW)
        high = np.minimum(ends[range_of], (window + 1) * PREFETCH_WINDOW)
        whole = high - low == PREFETCH_WINDOW
        ask = ~(whole & self.asked[window])
        self.asked[window[whole]] = True
        for offset, length in zip(low[ask].tolist(), (high - low)[ask].tolist(), strict=True):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> VectorRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rescore(queries: np.ndarray, shortlist: np.ndarray, vectors: np.ndarray | VectorRows,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k (scores, rows) of each query among its shortlisted rows (-1: padding, kept last).

    One query at a time: its R rows are a few hundred KB that stay in cache, where a batched gather
    would build a [batch, R, d] float32 copy several times slower to fill. The rows are widened to
    float32 by torch: numpy converts float16 one element at a time, torch with the CPU's vector
    instructions, which made the conversion, not the disk, most of a re-scored search's cost."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, shortlist.shape[1])
    scores = np.full(shortlist.shape, -np.inf, np.float32)
    for i, (query, rows) in enumerate(zip(queries, shortlist, strict=True)):
        valid = rows >= 0
        block = torch.from_numpy(np.ascontiguousarray(vectors[rows[valid]]))
        scores[i, valid] = (block.float() @ torch.from_numpy(query)).numpy()
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, top, 1)
    return top_scores, np.where(np.isfinite(top_scores), np.take_along_axis(shortlist, top, 1), -1)


class RescoredIndex:
    """A first-pass FAISS index whose top-`shortlist` answer is re-scored exactly from a vectors file.

    It answers `search(queries, k)` and `ntotal` like a FAISS index, so the callers do not change."""

    def __init__(self, first_pass: Any, vectors_path: Path | str, shortlist: int):
        self.first_pass, self.vectors_path, self.shortlist = first_pass, Path(vectors_path), shortlist
        self.ntotal, self.d = first_pass.ntotal, first_pass.d
        checked_layout(self.vectors_path, self.ntotal, self.d)  # refuse a bad file now, not mid-run

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk by chunk, the first pass of the next chunk running in a thread while this one is re-scored:
        FAISS releases the GIL and keeps the cores busy, the re-scoring waits mostly on `pread`, so the two
        overlap instead of taking turns."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not len(queries):
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        width = min(max(k, self.shortlist), self.ntotal)
        chunks = [queries[start : start + SEARCH_CHUNK] for start in range(0, len(queries), SEARCH_CHUNK)]
        found = []
        with VectorRows(self.vectors_path, self.ntotal, self.d) as rows_of:

            def shortlist_of(chunk: np.ndarray) -> np.ndarray:
                shortlist = self.first_pass.search(chunk, width)[1]
                rows_of.prefetch(shortlist)
                return shortlist

            if len(chunks) == 1:  # nothing to overlap: no thread for a single chunk (one query, held rows)
                return rescore(queries, shortlist_of(queries), rows_of, k)
            with ThreadPoolExecutor(1, thread_name_prefix="first-pass") as pool:
                pending = pool.submit(shortlist_of, chunks[0])
                for i, chunk in enumerate(chunks):
                    shortlist = pending.result()
                    if i + 1 < len(chunks):
                        pending = pool.submit(shortlist_of, chunks[i + 1])
                    found.append(rescore(chunk, shortlist, rows_of, k))
        return np.concatenate([scores for scores, _ in found]), np.concatenate([rows for _, rows in found])

    def check_pairing(self, probes: int = 8) -> None:
        """Ask the first pass for a few of the file's own rows: each must come back in its own shortlist.

        A vectors file from another build of the same shape finds none of its rows; the artifact's
        sha256 covers corruption of the right file."""
        rows = np.unique(np.linspace(0, self.ntotal - 1, min(probes, self.ntotal)).astype(np.int64))
        with VectorRows(self.vectors_path, self.ntotal, self.d) as rows_of:
            queries = rows_of[rows].astype(np.float32)
        _, shortlist = self.first_pass.search(queries, min(max(self.shortlist, 1), self.ntotal))
        found = int(sum(row in answer for row, answer in zip(rows, shortlist, strict=True)))
        if 2 * found <= len(rows):
            raise VectorsFileError(f"{self.vectors_path}: only {found} of {len(rows)} probe rows are in their own "
                                   f"shortlist: the vectors are not the ones this index was built from")
