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


def test_conflict_names_keep_the_extension_last():
    from s3stashfs.uploads import conflict_key
    when = 1795257753.0  # 2026-11-21T10:42:33Z
    assert conflict_key("runs/sample.vcf.gz", when) == "runs/sample.conflict-20261121T104233Z.vcf.gz"
    assert conflict_key("a.txt", when, 2) == "a.conflict-20261121T104233Z-2.txt"
    assert conflict_key("x.bam.bai", when) == "x.bam.conflict-20261121T104233Z.bai"
    assert conflict_key("d/.bashrc", when) == "d/.bashrc.conflict-20261121T104233Z"
    assert conflict_key("README", when) == "README.conflict-20261121T104233Z"


def test_conflict_names_fit_in_255_bytes():
    from s3stashfs.uploads import conflict_key
    long = "d/" + "é" * 120 + ".fastq.gz"  # 240 + 9 bytes
    name = conflict_key(long, 0.0, 12).split("/")[-1]
    assert len(name.encode()) <= 255 and name.endswith("-12.fastq.gz")
    name.encode().decode()  # not cut inside a character
