"""Reading an image's geometry without opening it."""

from __future__ import annotations

import pytest

from imagebuild.imagefs import gpt_sector_size

pytestmark = pytest.mark.unit


def test_gpt_sector_size_from_the_header_position() -> None:
    blank = bytearray(8192)
    assert gpt_sector_size(bytes(blank)) is None
    on_512 = bytearray(blank)
    on_512[512:520] = b"EFI PART"
    assert gpt_sector_size(bytes(on_512)) == 512
    on_4096 = bytearray(blank)
    on_4096[4096:4104] = b"EFI PART"
    assert gpt_sector_size(bytes(on_4096)) == 4096
    assert gpt_sector_size(bytes(on_512[:600])) == 512  # a short read is not an error
