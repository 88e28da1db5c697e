"""Deterministic bioinformatics test files and the real tools that read them.

`make_bam` writes a coordinate-sorted, indexed BAM (a few MB, so reads span many
64 KiB cache blocks); `make_vcf` a bgzipped, tabix-indexed VCF. The same seed gives
the same bytes wherever the files are written (`--no-PG` keeps paths out of the BAM
header). The query functions run samtools / tabix on any path - a local copy or a
path inside the mount - and return stdout bytes, so a test can compare the two.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REFS: dict[str, int] = {"chr1": 1_000_000, "chr2": 500_000}

HAVE_SAMTOOLS = shutil.which("samtools") is not None
HAVE_HTSLIB_TOOLS = shutil.which("bgzip") is not None and shutil.which("tabix") is not None

requires_samtools = pytest.mark.skipif(not HAVE_SAMTOOLS, reason="samtools is not installed")
requires_tabix = pytest.mark.skipif(
    not HAVE_HTSLIB_TOOLS, reason="bgzip/tabix (htslib) are not installed"
)

_BASES = bytes(b"ACGT"[i % 4] for i in range(256))
_QUALS = bytes(ord("#") + i % 40 for i in range(256))  # Phred+33 qualities 2..41


@dataclass
class BamFiles:
    bam: Path
    bai: Path
    refs: dict[str, int]
    n_mapped: int
    n_unmapped: int

    @property
    def paths(self) -> list[Path]:
        return [self.bam, self.bai]


@dataclass
class VcfFiles:
    vcf: Path  # the plain text, for reference answers
    vcf_gz: Path
    tbi: Path
    refs: dict[str, int]
    n_records: int
    samples: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """The files a user would put in S3 (the plain text is only a reference)."""
        return [self.vcf_gz, self.tbi]


def _run(cmd: list[str], timeout: float = 120.0, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cmd, capture_output=True, stdin=subprocess.DEVNULL,
        timeout=timeout, **kwargs,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
        )
    return result


def make_bam(
    directory: str | os.PathLike,
    name: str = "sample",
    seed: int = 1,
    n_reads: int = 30_000,
    read_len: int = 100,
    n_unmapped: int = 200,
    refs: dict[str, int] = REFS,
) -> BamFiles:
    """Write `<name>.bam` + `<name>.bam.bai` (about 3.6 MB at the defaults, well under 1 s)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    total = sum(refs.values())
    lines = ["@HD\tVN:1.6\tSO:unsorted"]
    lines += [f"@SQ\tSN:{chrom}\tLN:{length}" for chrom, length in refs.items()]
    lines.append(f"@RG\tID:rg1\tSM:{name}")
    n = 0
    for chrom, length in refs.items():
        for _ in range(n_reads * length // total):
            seq = rnd.randbytes(read_len).translate(_BASES).decode()
            qual = rnd.randbytes(read_len).translate(_QUALS).decode()
            pos = rnd.randrange(1, length - read_len + 2)
            flag = 16 if rnd.random() < 0.5 else 0
            lines.append(
                f"r{n:07d}\t{flag}\t{chrom}\t{pos}\t{rnd.randrange(0, 61)}\t{read_len}M\t*\t0\t0"
                f"\t{seq}\t{qual}\tRG:Z:rg1\tNM:i:{rnd.randrange(0, 4)}"
            )
            n += 1
    for i in range(n_unmapped):
        seq = rnd.randbytes(read_len).translate(_BASES).decode()
        qual = rnd.randbytes(read_len).translate(_QUALS).decode()
        lines.append(f"u{i:07d}\t4\t*\t0\t0\t*\t*\t0\t0\t{seq}\t{qual}\tRG:Z:rg1")
    sam = directory / f"{name}.unsorted.sam"
    sam.write_text("\n".join(lines) + "\n")
    bam = directory / f"{name}.bam"
    # `samtools sort` reads SAM directly (same result as `view -b | sort`).
    _run(["samtools", "sort", "--no-PG", "-o", str(bam), str(sam)])
    _run(["samtools", "index", str(bam)])
    sam.unlink()
    return BamFiles(bam, Path(f"{bam}.bai"), dict(refs), n, n_unmapped)


def make_vcf(
    directory: str | os.PathLike,
    name: str = "calls",
    seed: int = 2,
    n_records: int = 40_000,
    n_samples: int = 6,
    refs: dict[str, int] = REFS,
) -> VcfFiles:
    """Write `<name>.vcf`, `<name>.vcf.gz` and `<name>.vcf.gz.tbi` (SNPs only, so a
    record overlaps a region exactly when its POS lies in it; ~1 MB compressed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    samples = [f"S{i + 1}" for i in range(n_samples)]
    lines = ["##fileformat=VCFv4.2", "##source=s3stashfs-tests"]
    lines += [f"##contig=<ID={c},length={n}>" for c, n in refs.items()]
    lines += [
        '##INFO=<ID=DP,Number=1,Type=Integer,Description="Total depth">',
        '##INFO=<ID=AF,Number=A,Type=Float,Description="Allele frequency">',
        '##FORMAT=<ID=GT,Number=1,Type=String,Description="Genotype">',
        '##FORMAT=<ID=DP,Number=1,Type=Integer,Description="Read depth">',
        '##FORMAT=<ID=GQ,Number=1,Type=Integer,Description="Genotype quality">',
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO\tFORMAT\t" + "\t".join(samples),
    ]
    total = sum(refs.values())
    genotypes = ["0/0", "0/1", "1/1", "./."]
    n = 0
    for chrom, length in refs.items():
        count = n_records * length // total
        for pos in sorted(rnd.sample(range(1, length + 1), count)):
            ref = "ACGT"[rnd.randrange(4)]
            alt = rnd.choice([b for b in "ACGT" if b != ref])
            fmt = "\t".join(
                f"{rnd.choice(genotypes)}:{rnd.randrange(0, 99)}:{rnd.randrange(0, 99)}"
                for _ in samples
            )
            lines.append(
                f"{chrom}\t{pos}\tv{n}\t{ref}\t{alt}\t{rnd.randrange(10, 999)}\tPASS"
                f"\tDP={rnd.randrange(1, 500)};AF={rnd.random():.4f}\tGT:DP:GQ\t{fmt}"
            )
            n += 1
    vcf = directory / f"{name}.vcf"
    vcf.write_text("\n".join(lines) + "\n")
    vcf_gz = directory / f"{name}.vcf.gz"
    with open(vcf, "rb") as src, open(vcf_gz, "wb") as dst:
        subprocess.run(["bgzip", "-c"], stdin=src, stdout=dst, check=True, timeout=120)
    _run(["tabix", "-f", "-p", "vcf", str(vcf_gz)])
    return VcfFiles(vcf, vcf_gz, Path(f"{vcf_gz}.tbi"), dict(refs), n, samples)


# ----------------------------------------------------------------------------- queries


def samtools(*args: str | os.PathLike, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run samtools unchecked (for tests that expect it to fail, e.g. offline)."""
    return subprocess.run(
        ["samtools", *map(str, args)], capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout,
    )


def samtools_view(
    bam: str | os.PathLike, region: str | None = None, *extra: str, timeout: float = 120.0
) -> bytes:
    """stdout of `samtools view --no-PG [extra...] <bam> [region]` (a region needs the
    .bai). --no-PG: otherwise `-H` output names the BAM's path in a @PG line, and a
    local copy and the same file in the mount would differ."""
    cmd = ["samtools", "view", "--no-PG", *extra, str(bam)] + ([region] if region else [])
    return _run(cmd, timeout=timeout).stdout


def samtools_count(bam: str | os.PathLike, region: str | None = None, timeout: float = 120.0) -> int:
    """`samtools view -c <bam> [region]` as an int."""
    return int(samtools_view(bam, region, "-c", timeout=timeout))


def samtools_header(bam: str | os.PathLike, timeout: float = 60.0) -> bytes:
    return samtools_view(bam, None, "-H", timeout=timeout)


def tabix_query(vcf_gz: str | os.PathLike, region: str, timeout: float = 120.0) -> bytes:
    """stdout of `tabix <vcf.gz> <region>` (needs the .tbi beside the file)."""
    return _run(["tabix", str(vcf_gz), region], timeout=timeout).stdout


def parse_region(region: str) -> tuple[str, int, int]:
    """'chr1:1,000-2000' -> ('chr1', 1000, 2000); 'chr1' -> ('chr1', 1, huge)."""
    chrom, _, span = region.partition(":")
    if not span:
        return chrom, 1, 2**62
    start, _, end = span.replace(",", "").partition("-")
    return chrom, int(start), int(end) if end else 2**62


def vcf_region_reference(vcf_text: str | os.PathLike, region: str) -> bytes:
    """The records `tabix` should print for `region`, by filtering the plain VCF text
    (exact for SNP-only files such as `make_vcf` writes)."""
    chrom, start, end = parse_region(region)
    out = []
    with open(vcf_text, "rb") as f:
        for line in f:
            if line.startswith(b"#"):
                continue
            fields = line.split(b"\t", 2)
            if fields[0].decode() == chrom and start <= int(fields[1]) <= end:
                out.append(line)
    return b"".join(out)
