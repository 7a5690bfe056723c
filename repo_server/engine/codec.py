"""Chunk (de)compression and verification, safe to call from any worker thread.

zstandard's compressor and decompressor objects must not be shared across threads,
so each thread keeps its own.
"""

from __future__ import annotations

import threading

import zstandard

from chunkyard.wire import CODEC_RAW, CODEC_ZSTD, digest

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=1)
    return c


class CodecError(ValueError):
    pass


def decode(codec: int, raw_len: int, stored: bytes | memoryview) -> bytes:
    """Return the raw bytes of a stored chunk, refusing anything that is not exactly raw_len long."""
    if codec == CODEC_RAW:
        if len(stored) != raw_len:
            raise CodecError(f"raw payload is {len(stored)} bytes, raw_len says {raw_len}")
        return bytes(stored)
    if codec == CODEC_ZSTD:
        # Check the declared size before decompressing anything: python-zstandard ignores
        # max_output_size when the frame header declares a size, so a bomb would be inflated first.
        try:
            declared = zstandard.frame_content_size(stored)
        except zstandard.ZstdError:
            raise CodecError("payload is not a zstd frame") from None
        if declared != raw_len:
            shown = "no size" if declared < 0 else f"{declared} bytes"
            raise CodecError(f"zstd frame declares {shown}, raw_len says {raw_len} (one frame with its content "
                             "size is required)")
        try:
            raw = _decompressor().decompress(stored, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise CodecError(f"zstd payload does not decompress: {e}") from None
        if len(raw) != raw_len:
            raise CodecError(f"zstd payload decompresses to {len(raw)} bytes, raw_len says {raw_len}")
        return raw
    raise CodecError(f"unknown codec {codec}")


def decode_verified(codec: int, raw_len: int, stored: bytes | memoryview, expected: bytes) -> bytes:
    raw = decode(codec, raw_len, stored)
    if digest(raw) != expected:
        raise CodecError("BLAKE3 of the payload does not match its digest")
    return raw


def compress(raw: bytes) -> tuple[int, bytes]:
    """zstd-1 when it shrinks the chunk, else raw (DESIGN §3)."""
    packed = _compressor().compress(raw)
    return (CODEC_ZSTD, packed) if len(packed) < len(raw) else (CODEC_RAW, raw)
