import pytest

from vdev.virtio.units import parse_size

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64K", 65536),
        ("64k", 65536),
        ("1M", 1 << 20),
        ("2GiB", 2 << 30),
        ("1MB", 1 << 20),
        (" 3t ", 3 << 40),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "12x", "-1", "0", "1.5M", "M", "0K"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_multiple_of() -> None:
    assert parse_size("1K", multiple_of=512) == 1024
    with pytest.raises(ValueError, match="multiple of 512"):
        parse_size("1000", multiple_of=512)
