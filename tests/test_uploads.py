"""Unit tests of upload planning."""
from s3stashfs.uploads import MAX_PARTS, part_size_for

MiB = 1 << 20


def test_part_size_is_the_setting_when_it_fits():
    assert part_size_for(150 * MiB, 8 * MiB) == 8 * MiB
    assert part_size_for(MAX_PARTS * 8 * MiB, 8 * MiB) == 8 * MiB


def test_parts_grow_so_that_5_tib_fits_in_10000_parts():
    size = 5 * (1 << 40)
    ps = part_size_for(size, 8 * MiB)
    assert ps % MiB == 0 and ps > 8 * MiB
    assert -(-size // ps) <= MAX_PARTS
    assert -(-size // (ps - MiB)) > MAX_PARTS  # the smallest whole-MiB size that fits
