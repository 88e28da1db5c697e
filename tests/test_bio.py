"""Real bioinformatics tools reading through a real mount: samtools on an indexed BAM,
tabix and zcat on a bgzipped VCF, each compared with the same tool on the local file.

And the point of the design (README, SEMANTICS "Reads"): region queries on a BAM fetch
the index whole and only the blocks of the BAM they touch, not the file.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

import biodata
import helpers

pytestmark = pytest.mark.timeout(180)

PREFIX = "runs/2024/"

BAM_REGIONS = [
    "chr1:100000-101000",
    "chr1:150000-200000",  # a thousand reads: many consecutive BGZF blocks
    "chr1:700000-701000",
    "chr2:1-2000",  # the first reads of the second reference
    "chr2:250000-251000",
    "chr2:600000-700000",  # past the end of chr2 (500,000): no reads
]

VCF_REGIONS = ["chr1:1-5000", "chr1:250000-260000", "chr2:100000-180000", "chr2:499000-500000"]

FETCHED_BAM_FRACTION = 0.6  # region queries must fetch well under the whole BAM


def fetched_bytes(requests, size: int) -> int:
    """Bytes asked for by these GETs (a GET without Range is the whole object)."""
    total = 0
    for r in requests:
        span = r.range_span(size)
        total += size if span is None else span[1] - span[0]
    return total


def assert_fetched_whole_once(moto_server, mark, key: str, size: int) -> None:
    gets = moto_server.requests_since(mark, op="GetObject", key=key)
    assert len(gets) == 1, f"{key}: {[str(r) for r in gets]}"
    span = gets[0].range_span(size)
    assert span is None or span == (0, size), f"{key} was not fetched whole: {gets[0]}"


def empty_vcf_region(vcf_text, chrom: str = "chr2") -> str:
    """A region between two records of `chrom`, with no record in it."""
    positions = []
    with open(vcf_text, "rb") as f:
        for line in f:
            if line.startswith(chrom.encode() + b"\t"):
                positions.append(int(line.split(b"\t", 2)[1]))
    for a, b in zip(positions, positions[1:]):
        if b - a > 20:
            return f"{chrom}:{a + 1}-{b - 1}"
    raise AssertionError(f"no gap between records of {chrom}")


def test_samtools_regions_through_the_mount(mount, bucket, s3, moto_server, bam_files):
    bam = bam_files
    helpers.upload_files(s3, bucket, PREFIX, bam.paths)
    size = bam.bam.stat().st_size
    bam_key, bai_key = PREFIX + bam.bam.name, PREFIX + bam.bai.name

    m = mount(bucket=bucket)
    mounted = m.path / PREFIX / bam.bam.name
    assert mounted.stat().st_size == size

    mark = moto_server.mark()
    marks = [("view -H", moto_server.mark())]
    assert biodata.samtools_header(mounted) == biodata.samtools_header(bam.bam)
    for region in BAM_REGIONS:
        marks.append((region, moto_server.mark()))
        local = biodata.samtools_view(bam.bam, region)
        assert biodata.samtools_view(mounted, region) == local, region
        count = biodata.samtools_count(mounted, region)
        assert count == biodata.samtools_count(bam.bam, region) == local.count(b"\n"), region
    assert biodata.samtools_count(bam.bam, BAM_REGIONS[1]) > 500  # it spans many reads
    assert biodata.samtools_count(bam.bam, BAM_REGIONS[-1]) == 0  # and one has none

    # Before anything reads the whole BAM: the index was fetched whole, once; of the
    # BAM only the blocks the queries touched (plus read-ahead).
    moto_server.wait_quiet()
    assert_fetched_whole_once(moto_server, mark, bai_key, bam.bai.stat().st_size)
    bam_gets = moto_server.requests_since(mark, op="GetObject", key=bam_key)
    assert all(r.if_match for r in bam_gets), "every GET is pinned to the ETag seen at open"
    fetched = fetched_bytes(bam_gets, size)
    # Which query asked for what (approximate: read-ahead may land after the next mark).
    per_query = []
    for (name, start), (_, end) in zip(marks, marks[1:] + [("", moto_server.mark())]):
        spans = [r.range for r in bam_gets if start.offset <= r.offset < end.offset]
        per_query.append(f"  {name}: {spans}")

    # Reads of the whole file agree too (checked before the byte count, which is the
    # last assertion, so that a failure of it still shows all the rest passed).
    assert biodata.samtools_count(mounted) == biodata.samtools_count(bam.bam)
    assert helpers.md5_file(mounted) == helpers.md5_file(bam.bam)

    assert 0 < fetched < FETCHED_BAM_FRACTION * size, (
        f"region queries fetched {fetched} bytes of a {size}-byte BAM "
        f"({fetched / size:.0%}) in {len(bam_gets)} GETs:\n" + "\n".join(per_query)
    )


def test_tabix_and_zcat_through_the_mount(mount, bucket, s3, moto_server, vcf_files):
    vcf = vcf_files
    helpers.upload_files(s3, bucket, PREFIX, vcf.paths)
    gz_key, tbi_key = PREFIX + vcf.vcf_gz.name, PREFIX + vcf.tbi.name

    m = mount(bucket=bucket)
    mounted = m.path / PREFIX / vcf.vcf_gz.name

    mark = moto_server.mark()
    empty = empty_vcf_region(vcf.vcf)
    for region in VCF_REGIONS + [empty]:
        reference = biodata.vcf_region_reference(vcf.vcf, region)
        assert biodata.tabix_query(vcf.vcf_gz, region) == reference, region
        assert biodata.tabix_query(mounted, region) == reference, region
        if region == empty:
            assert reference == b""
        else:
            assert reference.count(b"\n") > 0, region
    moto_server.wait_quiet()
    assert_fetched_whole_once(moto_server, mark, tbi_key, vcf.tbi.stat().st_size)
    assert moto_server.requests_since(mark, op="GetObject", key=gz_key)

    for tool in (["zcat"], ["gzip", "-dc"]):
        r = subprocess.run(
            [*tool, str(mounted)], capture_output=True, stdin=subprocess.DEVNULL, timeout=60,
        )
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        assert r.stdout == vcf.vcf.read_bytes(), tool


def test_samtools_sort_and_tabix_write_into_the_mount(mount, s3, bucket, bam_files, vcf_files, tmp_path):
    """Tools write straight into the mount; what they write equals a local run's output."""
    m = mount(bucket=bucket)
    os.mkdir(m.path / "out")
    local = tmp_path / "local"
    local.mkdir()
    for out in (local, m.path / "out"):
        r = subprocess.run(["samtools", "sort", "--no-PG", "-o", str(out / "x.sorted.bam"),
                            str(bam_files.bam)], capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
        shutil.copy(vcf_files.vcf_gz, out / "calls.vcf.gz")
        r = subprocess.run(["tabix", "-p", "vcf", str(out / "calls.vcf.gz")], capture_output=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
    for name in ("x.sorted.bam", "calls.vcf.gz", "calls.vcf.gz.tbi"):
        want = (local / name).read_bytes()
        assert (m.path / "out" / name).read_bytes() == want, name
        assert s3.get_object(Bucket=bucket, Key=f"out/{name}")["Body"].read() == want, name
    assert sorted(os.listdir(m.path / "out")) == ["calls.vcf.gz", "calls.vcf.gz.tbi", "x.sorted.bam"]
