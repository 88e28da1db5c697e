#!/usr/bin/env python3
"""The demo behind `bash scripts/demo`: everything it starts, it stops; everything it mounts,
it unmounts, even on errors or Ctrl-C."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _s3server import running_server  # noqa: E402

import biodata  # noqa: E402  (the generator of the test suite's BAM and VCF files)
from proxy import TcpProxy  # noqa: E402  (the test suite's loopback proxy: the "network")

BIN = Path(sys.executable).parent
BUCKET = "demo-lab"


def show(cmd: str, env: dict, cwd: Path, ok=(0,)) -> None:
    print(f"\n$ {cmd}", flush=True)
    t = time.monotonic()
    r = subprocess.run(cmd, shell=True, env=env, cwd=cwd, text=True, capture_output=True)
    out = (r.stdout + r.stderr).rstrip()
    lines = out.splitlines()
    print("\n".join(lines[:12] + ([f"... ({len(lines) - 12} more lines)"] if len(lines) > 12 else [])))
    print(f"  [{time.monotonic() - t:.2f} s, exit {r.returncode}]", flush=True)
    if r.returncode not in ok:
        raise SystemExit(f"demo step failed: {cmd}")


def cached(cache_dir: Path) -> None:
    db = sqlite3.connect(cache_dir / "catalog.sqlite3")
    print("\nWhat the cache holds (catalog.sqlite3; data files are named by hash, never by key):")
    print(f"  {'key':34} {'size':>10} {'cached':>10}  file")
    for key, size, file in db.execute("SELECT key, size, file FROM objects ORDER BY key"):
        on_disk = os.stat(cache_dir / file).st_blocks * 512 if (cache_dir / file).exists() else 0
        print(f"  {key:34} {size:>10} {min(on_disk, size):>10}  {file}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="s3stashfs-demo-"))
    mnt, cache = work / "s3", work / "cache"
    mnt.mkdir()
    print("Generating a small indexed BAM and a bgzipped, tabix-indexed VCF with samtools/tabix ...")
    bam = biodata.make_bam(work / "local", n_reads=60_000)
    vcf = biodata.make_vcf(work / "local")
    with running_server("moto") as srv, TcpProxy("127.0.0.1", int(srv.endpoint_url.rsplit(":", 1)[1])) as net:
        print(f"S3 server (moto) on {srv.endpoint_url}, pid {srv.pid}; the mount reaches it "
              f"through a loopback proxy, {net.url}, that plays the network")
        (work / "demo.env").write_text("# the demo's settings come from its command line\n")
        env = {**os.environ, **srv.env, "S3STASHFS_ENV": str(work / "demo.env")}
        s3 = srv.client()
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="notes.txt", Body=b"Sequencing run 2024-03: 2 samples, see runs/2024/\n")
        s3.put_object(Bucket=BUCKET, Key="other/never-read.txt", Body=b"not cached\n")
        for p, key in ((bam.bam, "runs/2024/sample.bam"), (bam.bai, "runs/2024/sample.bam.bai"),
                       (vcf.vcf_gz, "runs/2024/calls.vcf.gz"), (vcf.tbi, "runs/2024/calls.vcf.gz.tbi")):
            s3.upload_file(str(p), BUCKET, key)
        region = next(iter(bam.refs)) + ":20000-30000"
        mounted = False
        try:
            show(f"{BIN}/s3stashfs mount {mnt} --endpoint-url {net.url} --cache-dir {cache} "
                 f"--log-file {work}/mount.log", env, work)
            mounted = True
            show("ls s3", env, work)
            show(f"ls -l s3/{BUCKET}/runs/2024/", env, work)
            show(f"cat s3/{BUCKET}/notes.txt", env, work)
            show(f"samtools view -c s3/{BUCKET}/runs/2024/sample.bam {region}", env, work)
            show(f"tabix s3/{BUCKET}/runs/2024/calls.vcf.gz {region} | head -3 | cut -c1-80", env, work)
            show(f"""python3 -c 'print(open("s3/{BUCKET}/notes.txt").read().strip())'""", env, work)
            cached(cache)
            print("\nThe same region again: the ETags are checked, the cached blocks are served.")
            show(f"samtools view -c s3/{BUCKET}/runs/2024/sample.bam {region}", env, work)
            offline(net, mnt, cache, env, work, region)
        finally:
            if mounted:
                show(f"{BIN}/s3stashfs unmount {mnt}", env, work)
    print(f"\nDone. The cache stays in {cache} for the next mount; the log is {work}/mount.log.")
    return 0


def offline(net: TcpProxy, mnt: Path, cache: Path, env: dict, work: Path, region: str) -> None:
    print("\nPin a directory before a trip: all of it is fetched now, kept offline, never evicted.")
    show(f"{BIN}/s3stashfs pin s3/{BUCKET}/runs/2024/ --progress", env, work)
    show(f"{BIN}/s3stashfs cache size --cache-dir {cache}", env, work)
    print("\nThe network goes away (the proxy now refuses connections).")
    net.set_mode("refuse")
    show(f"samtools view -c s3/{BUCKET}/runs/2024/sample.bam", env, work)
    show(f"tabix s3/{BUCKET}/runs/2024/calls.vcf.gz {region} | wc -l", env, work)
    show(f"cat s3/{BUCKET}/other/never-read.txt", env, work, ok=(1,))
    show(f"{BIN}/s3stashfs status {mnt}", env, work, ok=(3,))
    print("\nThe network comes back; the mount notices by itself.")
    net.set_mode("pass")
    deadline = time.monotonic() + 30
    while subprocess.run([f"{BIN}/s3stashfs", "status", str(mnt)], env=env,
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("demo: the mount did not come back online within 30 s")
        time.sleep(0.5)
    show(f"cat s3/{BUCKET}/other/never-read.txt", env, work)
    show(f"{BIN}/s3stashfs status {mnt}", env, work)


if __name__ == "__main__":
    sys.exit(main())
