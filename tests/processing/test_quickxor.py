"""QuickXorHash against published vectors and a per-byte reference implementation."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processing.destinations.quickxor import QuickXorHash, quickxor_b64

# (input, QuickXorHash), both base64; from rclone's quickxorhash test vectors.
VECTORS = [
    ("", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
    ("Sg==", "SgAAAAAAAAAAAAAAAQAAAAAAAAA="),
    ("tbQ=", "taAFAAAAAAAAAAAAAgAAAAAAAAA="),
    ("0pZP", "0rDEEwAAAAAAAAAAAwAAAAAAAAA="),
    ("2fuxhBJXtpWFe8dOfdGeHw==", "O9tHLAghgSvYohKFyMMxnNCHaHg="),
    (
        (
            "ikwCorI7PKWz17EI50jZCGbV9JU2E8bXVfxNMg5zdmqSZ2NlsQPp0kqYIPjzwTg1MBtfWPg53k0h0P2naJNEVgrqpoHTfV2b"
            "3pJ4m0zYPTJmUX4Bg/lOxcnCxAYKU29Y5F0U8Quz7ZXFBEweftXxJ7RS4r6N7BzJrPsLhY7hgck="
        ),
        "imAoFvCWlDn4yVw3/oq1PDbbm6U=",
    ),
]


def reference(data: bytes) -> str:
    """Microsoft's definition, one byte at a time: XOR at bit (11*i) mod 160, wrapping."""
    register = 0
    for index, byte in enumerate(data):
        shift = (11 * index) % 160
        register ^= ((byte << shift) | (byte >> (160 - shift))) & ((1 << 160) - 1)
    register ^= len(data) << 96
    return base64.b64encode(register.to_bytes(20, "little")).decode()


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_published_vectors(data: str, expected: str) -> None:
    raw = base64.b64decode(data)
    assert quickxor_b64(raw) == expected
    assert reference(raw) == expected


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=1, max_value=400), max_size=20))
def test_incremental_equals_reference(data: bytes, cuts: list[int]) -> None:
    digest = QuickXorHash()
    position = 0
    for cut in cuts:
        digest.update(data[position : position + cut])
        position += cut
    copy = digest.copy()
    digest.update(data[position:])
    assert digest.b64digest() == reference(data)
    copy.update(data[position:])
    assert copy.b64digest() == digest.b64digest()


@pytest.mark.parametrize("cut", [1 << 20, 64 * 1024 + 7, 160 * 64, 999])
def test_large_inputs_fold_the_same(cut: int) -> None:
    data = random.Random(cut).randbytes(300_000)
    digest = QuickXorHash()
    for start in range(0, len(data), cut):
        digest.update(data[start : start + cut])
    assert digest.b64digest() == reference(data)
