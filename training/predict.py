"""Predict the trajectory (and reasoning) of one row or of every row in a folder of shards.

    python -m training.predict --checkpoint out/sft_tiny --data data/build/shards/validation-nuscenes-00000-00000.parquet \\
        --sample-id nuscenes/scene-0103/3                     # one row
    python -m training.predict --checkpoint out/sft_tiny --data data/build/shards --max-samples 8   # a folder

Prints, per row, the think mode, the reasoning (slow thinking), the 10 action
tokens and the decoded trajectory (x, y, heading at 0.5 s steps, ego frame
at t0); ``--json`` prints one JSON object per row instead. A malformed output
prints its parse errors (nothing is padded). Exit status 2 when the sample id
is not found or the output of every row was malformed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from training.cli import emit

log = logging.getLogger(__name__)


def shard_glob(data: str) -> str:
    """A folder of shards -> its ``*.parquet`` glob; files and globs pass through."""
    p = Path(data)
    return str(p / "*.parquet") if p.is_dir() else data


def format_record(r: dict[str, Any]) -> str:
    lines = [f"{r['sample_id']} ({r['dataset']}): {r['think_mode']} thinking, {r['latency_s']:.2f} s"]
    if r["reasoning"]:
        lines += ["  reasoning:", *(f"    {x}" for x in r["reasoning"].splitlines())]
    if r["format_error"]:
        lines.append(f"  malformed output: {r['format_error']}")
        lines.append(f"  text: {r['text'][:200]!r}")
        return "\n".join(lines)
    lines.append(f"  action tokens: {r['action_tokens']}")
    lines.append("  trajectory:   t(s)      x(m)      y(m)  heading(rad)")
    for i, (x, y, h) in enumerate(r["trajectory"]):
        lines.append(f"              {0.5 * (i + 1):4.1f} {x:9.2f} {y:9.2f} {h:13.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="checkpoint, run directory (latest step) or export")
    ap.add_argument("--data", required=True, help="a built shard, a folder of shards, or a glob")
    ap.add_argument("--sample-id", default=None, help="predict only this row")
    ap.add_argument("--codebook", default="data/codebook", help="codebook directory (default: %(default)s)")
    ap.add_argument("--max-samples", type=int, default=None, help="stop after this many rows")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--cpu-threads", type=int, default=0, help="torch intra-op threads on CPU (0: default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    from training.data import BuiltRows, ShardIndex, collate
    from training.eval import codebook_decoder, generate, make_record
    from training.loading import load_merged
    from training.model import read_num_action_tokens

    try:
        k = read_num_action_tokens(args.codebook)
        decode_fn = codebook_decoder(args.codebook)
        index = ShardIndex.from_glob(shard_glob(args.data))
        model, proc, ids = load_merged(args.checkpoint, k)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    rows = BuiltRows(index, proc, num_action_tokens=k, with_target=False, check_stored_messages=False)
    picks = range(len(rows))
    if args.sample_id:
        picks = [i for i in range(len(rows)) if rows.raw_row(i).get("sample_id") == args.sample_id][:1]
        if not picks:
            log.error("sample %r not found in %s", args.sample_id, args.data)
            return 2
    n_ok = n = 0
    import time

    for i in picks:
        if args.max_samples and n >= args.max_samples:
            break
        ex = rows[i]
        t0 = time.perf_counter()
        text = generate(model, collate([ex], proc.tokenizer.pad_token_id, padding_side="left"), proc.tokenizer,
                        args.max_new_tokens)[0]
        rec = make_record(text, ex["meta"], ids.count, decode_fn, time.perf_counter() - t0)
        n += 1
        n_ok += rec["format_error"] is None
        emit(rec if args.json else format_record(rec))
    log.info("%d rows, %d well-formed", n, n_ok)
    return 0 if n_ok else 2


if __name__ == "__main__":
    sys.exit(main())
