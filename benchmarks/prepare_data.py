"""Throughput of `ctcd-ds prepare-data`: tokens/s and MB/s of text, for each data.num_proc.

    python benchmarks/prepare_data.py [--mb 100] [--num-proc 1 2] [--seq-len 128] [--rust-threads] [--quick]

Makes a corpus of about ``--mb`` MB by repeating the bundled WikiText-2 training text (in a temporary
directory), trains the bundled corpus's tokenizer once (the default run's: ``tokenizer.vocab_size`` 8192, kept
in the ctcd-ds tokenizer cache), then prepares the corpus with each ``--num-proc`` through the real code path
(:func:`ctcd_ds.prepared.prepare_data`), each in a fresh process, and prints one row per num_proc:

- ``seconds``, ``tokens/s``, ``MB/s``: the whole preparation (hashing the sources, text -> Arrow, tokenizing,
  grouping, the held-out split, writing, fsync); tokens = the tokens of the written blocks.
- ``tok_s``, ``tok/s/proc``: the tokenizing pass alone (the part ``num_proc`` spreads over processes), and that
  rate per process; ``rest_s``: everything else (one process whatever num_proc).
- ``B/token``: bytes per token as stored; ``disk_x``: the peak size of the directory being written (the
  text's Arrow copy, token lists, blocks) over the text size; ``RSS_MB`` / ``worker_MB``: peak resident memory
  of the preparing process and of its largest worker.

``TOKENIZERS_PARALLELISM=false`` unless ``--rust-threads``: each process then tokenizes on one core, so
tok/s/proc is a per-core figure. First, a probe says how many cores are really free (on a shared machine
other work takes some): a fixed tokenizing job runs alone, then as max(--num-proc) concurrent copies; free
cores = copies x (time alone / mean time of a copy). The last line is the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctcd_ds.assets import BUNDLED_TRAIN  # noqa: E402

QUICK_MB = 2
"""--quick: a 2 MB corpus and a 1000-token vocabulary (seconds): checks the benchmark runs, not a measurement."""


def make_corpus(path: Path, mb: float) -> tuple[int, int]:
    """Repeat the bundled training text into ``path`` until it holds at least ``mb`` MB; (bytes, words)."""
    text = Path(BUNDLED_TRAIN[0]).read_bytes()
    target, written, copies = int(mb * 1e6), 0, 0
    with open(path, "wb") as fh:
        while written < target:
            fh.write(text)
            written, copies = written + len(text), copies + 1
    return written, copies * len(text.split())


class DiskPeak(threading.Thread):
    """Polls the total size of the files under ``parent`` whose path contains ``part``, keeping the peak."""

    def __init__(self, parent: Path, part: str):
        super().__init__(daemon=True)
        self.parent, self.part, self.peak, self.stop = parent, part, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            size = 0
            for dirpath, _, files in os.walk(self.parent):
                if self.part in dirpath:
                    for f in files:
                        try:
                            size += os.path.getsize(os.path.join(dirpath, f))
                        except OSError:
                            pass
            self.peak = max(self.peak, size)


def probe(tokenizer: str) -> float:
    """Child mode: seconds to tokenize the bundled training text twice, in batches of 1000 lines."""
    from ctcd_ds.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    lines = [line for line in Path(BUNDLED_TRAIN[0]).read_text(encoding="utf-8").splitlines() if line.strip()] * 2
    start = time.perf_counter()
    for i in range(0, len(lines), 1000):
        tok(lines[i : i + 1000], add_special_tokens=False, return_attention_mask=False, verbose=False)
    return time.perf_counter() - start


def free_cores(tokenizer: Path, copies: int, env: dict) -> tuple[float, float, list[float]]:
    """(cores free for tokenizing, seconds of the probe alone, seconds of each of ``copies`` concurrent ones)."""
    cmd = [sys.executable, __file__, "--probe", f"--tokenizer={tokenizer}"]
    alone = float(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    together = [float(p.communicate()[0].split()[-1]) for p in procs]
    return copies * alone / (sum(together) / copies), alone, together


def one(args: argparse.Namespace) -> None:
    """Child mode: prepare the corpus once with ``--one`` processes; print a JSON line of figures."""
    import datasets

    import ctcd_ds.data  # noqa: F401 (imported before the clock starts: prepare_data imports them when called)
    import ctcd_ds.tasks  # noqa: F401
    from ctcd_ds.config import load_config
    from ctcd_ds.prepare import prepare_data

    tokenize_s = []
    real_map = datasets.Dataset.map

    def timed_map(self, *a, **kw):
        start = time.perf_counter()
        out = real_map(self, *a, **kw)
        if kw.get("desc") == "tokenize":
            tokenize_s.append(time.perf_counter() - start)
        return out

    datasets.Dataset.map = timed_map
    cfg = load_config(
        "ctcd",
        [
            f"--data.train_files=[{args.corpus}]",
            f"--data.seq_len={args.seq_len}",
            f"--data.num_proc={args.one}",
            f"--tokenizer.path={args.tokenizer}",
        ],
    )
    out = Path(args.out)
    disk = DiskPeak(out.parent, f".{out.name}.partial-")
    disk.start()
    start = time.perf_counter()
    result = prepare_data(cfg, out)
    seconds = time.perf_counter() - start
    disk.stop.set()
    disk.join()
    m = result["manifest"]
    print(
        json.dumps(
            {
                "num_proc": args.one,
                "seconds": seconds,
                "tokenize_seconds": sum(tokenize_s),
                "tokens": sum(m["tokens"].values()),
                "blocks": sum(m["blocks"].values()),
                "bytes_on_disk": sum(m["bytes"].values()),
                "bytes_per_token": m["bytes_per_token"],
                "peak_disk_bytes": disk.peak,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100, help="corpus size in MB (the bundled text repeated)")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc values to time")
    parser.add_argument("--seq-len", type=int, default=128, help="data.seq_len")
    parser.add_argument("--rust-threads", action="store_true", help="leave TOKENIZERS_PARALLELISM to the tokenizers")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_MB} MB corpus, 1000-token vocabulary")
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child mode: num_proc
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # child mode: the core probe
    args = parser.parse_args()
    if args.probe:
        return print(f"{probe(args.tokenizer):.4f}")
    if args.one:
        return one(args)
    from ctcd_ds.tokenizer import trained_tokenizer_dir

    vocab = 1000 if args.quick else 8192
    mb = QUICK_MB if args.quick else args.mb
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not args.rust_threads:
        env["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = trained_tokenizer_dir(BUNDLED_TRAIN, vocab, 200000)
    copies = max(args.num_proc)
    cores, alone, together = free_cores(tokenizer, copies, env)
    print(
        f"free cores for tokenizing: {cores:.2f} of {os.cpu_count()} (a fixed job: {alone:.2f} s alone, "
        f"{' / '.join(f'{t:.2f}' for t in together)} s as {copies} concurrent copies)"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="prepare_data_bench") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        size, words = make_corpus(corpus, mb)
        print(
            f"corpus: the bundled WikiText-2 train text repeated to {size / 1e6:.1f} MB ({words:,} words); "
            f"tokenizer {tokenizer} (vocab_size={vocab}); data.seq_len={args.seq_len}"
        )
        print(
            f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"TOKENIZERS_PARALLELISM={env.get('TOKENIZERS_PARALLELISM', '(unset)')}, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        for n in args.num_proc:
            out = Path(tmp) / f"prepared-{n}"
            cmd = [sys.executable, __file__, f"--one={n}", f"--corpus={corpus}", f"--tokenizer={tokenizer}"]
            cmd += [f"--out={out}", f"--seq-len={args.seq_len}"]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.exit(f"num_proc={n} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row |= {"text_bytes": size, "words": words}
            rows.append(row)
    print()
    header = (
        f"{'num_proc':>8} {'seconds':>7} {'tokens':>11} {'tokens/s':>9} {'MB/s':>5} {'tok_s':>6} {'tok/s/proc':>10} "
        f"{'rest_s':>6} {'B/token':>7} {'disk_x':>6} {'RSS_MB':>6} {'worker_MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        per_proc = r["tokens"] / r["tokenize_seconds"] / r["num_proc"]
        print(
            f"{r['num_proc']:>8} {r['seconds']:>7.1f} {r['tokens']:>11,} {r['tokens'] / r['seconds']:>9,.0f} "
            f"{size / 1e6 / r['seconds']:>5.2f} {r['tokenize_seconds']:>6.1f} {per_proc:>10,.0f} "
            f"{r['seconds'] - r['tokenize_seconds']:>6.1f} {r['bytes_per_token']:>7.3f} "
            f"{r['peak_disk_bytes'] / size:>6.2f} {r['peak_rss_mb']:>6.0f} {r['peak_worker_rss_mb']:>9.0f}"
        )
    print(f"tokens per word {rows[0]['tokens'] / words:.3f}, tokens per byte of text {rows[0]['tokens'] / size:.4f}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    summary = {"text_mb": round(size / 1e6, 1), "seq_len": args.seq_len, "vocab_size": vocab, "free_cores": cores}
    print(json.dumps(summary | {"rows": rows}))


if __name__ == "__main__":
    main()
