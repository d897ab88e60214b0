"""``drivevla annotate``: slow/fast selection and reasoning annotation of one dataset."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

from pipelines.commands.common import (
    add_engine_args,
    add_input_check_arg,
    add_set_arg,
    as_path,
    check_inputs,
    run_with_engine,
)
from pipelines.config import ConfigError, dump_config, load_config
from pipelines.io import fs
from pipelines.resources import config_path

log = logging.getLogger(__name__)

CONFIG = config_path("annotate.yaml")
EXTRACT_DIR, TOKENIZE_DIR, ANNOTATE_DIR = "extract", "tokenize", "annotate"

DESCRIPTION = """\
Choose slow or fast thinking for every sample (complexity score with reasons), then write
the four-part reasoning (scene, critical objects, ego intent, final action) for the slow
ones, and write the rows with the annotation columns to DATA/annotate/DATASET/.

Runs extraction first when DATA/extract/DATASET/ is missing, and tokenization when a
codebook exists in DATA/codebook/ (the annotated rows then carry action_tokens).

Annotators:
  vlm    (default) a vision-language model behind an OpenAI-compatible server; start one, e.g.
           vllm serve Qwen/Qwen2.5-VL-72B-Instruct --tensor-parallel-size 8 --port 8000 \\
             --limit-mm-per-prompt image=16 --max-model-len 32768
           python -m sglang.launch_server --model-path Qwen/Qwen2.5-VL-72B-Instruct --tp 8 --port 8000
         and pass --endpoint http://HOST:8000/v1 (repeat for several servers). The API key, if the
         server needs one, is read from $OPENAI_API_KEY (client.api_key_env) and never logged.
  rules  deterministic reasoning from labels and trajectories; no server needed. Only used when
         asked for.

Resumable: every answer is committed to DATA/annotate/DATASET/_cache/ before it counts. A rerun
of the same command sends exactly the requests that are missing or failed (retry_failed), rewrites
the input shards that held failures and skips the other finished ones. One run per output at a
time: a second run on the same output (also from another machine) is refused while the first
holds DATA/annotate/DATASET/_lease/.

Exit status: 0 when done; 1 when a partition crashed or annotations failed (other than prompts
too long for the model or impossible to build, which are recorded for the filter stage); 2 for
bad input, no server or refused key, or an output another run is writing.
The output schema is requested with response_format json_schema (client.guided), which current
vLLM and SGLang honour.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "annotate",
        help="select slow/fast thinking and annotate reasoning with a VLM (or the rules annotator)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="dataset name (waymo_e2e, nuscenes, nuplan)")
    p.add_argument(
        "--data", type=as_path, required=True,
        help="data root, local path or s3://... / gs://... (holds extract/, codebook/, annotate/)"
    )
    add_input_check_arg(p)
    p.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="annotation YAML (default: configs/annotate.yaml)",
    )
    p.add_argument(
        "--annotator",
        choices=("vlm", "rules"),
        default=None,
        help="override `annotator` (default from config: vlm)",
    )
    p.add_argument("--endpoint", action="append", default=None, metavar="URL",
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (repeatable: load is spread)")  # fmt: skip
    p.add_argument("--model", default=None, help="served model name (client.model)")
    p.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        help="upper bound on concurrent requests per worker",
    )
    p.add_argument(
        "--slow-fraction",
        type=float,
        default=None,
        help="share of samples given slow thinking (selection.slow_fraction)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="select and render prompts, send nothing, write nothing",
    )
    p.add_argument(
        "--show", type=int, default=3, metavar="N", help="with --dry-run: print N rendered prompts"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="annotate only the first N samples (shard order)",
    )
    p.add_argument(
        "--input",
        default=None,
        help="dataset root for the extraction run (if extraction is needed)",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="redo the annotate output (keeps the request cache, so answers are not paid for twice)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_arg(p)
    add_engine_args(p, default="local")


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.overrides)
    if args.annotator:
        out.append(f"annotator={args.annotator}")
    if args.endpoint:
        out.append("client.endpoints=[" + ",".join(f'"{u}"' for u in args.endpoint) + "]")
    if args.model:
        out.append(f'client.model="{args.model}"')
    if args.max_in_flight is not None:
        out.append(f"client.max_in_flight={args.max_in_flight}")
    if args.slow_fraction is not None:
        out += ["selection.mode=fraction", f"selection.slow_fraction={args.slow_fraction}"]
    return out


def ensure_input(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The annotate input: the extract dir (run if missing) and, if a codebook exists, the token table dir."""
    from pipelines.core.shards import list_shards

    extract_dir = args.data / EXTRACT_DIR / args.dataset
    if not list_shards(extract_dir):
        try:
            from pipelines.commands.extract import default_config
            from pipelines.sources.base import ExtractConfig
            from pipelines.stages.extract import ExtractStage
        except ImportError as exc:
            raise RuntimeError(
                f"{extract_dir} has no shards and the extraction stage is unavailable ({exc})"
            ) from None
        log.info("no extracted shards in %s: extracting %s first", extract_dir, args.dataset)
        overrides = [f"input={args.input}"] if args.input else []
        cfg = load_config(ExtractConfig, default_config(args.dataset), overrides)
        fs.makedirs(extract_dir)
        dump_config(cfg, extract_dir / "config.yaml")
        summary = run_with_engine(ExtractStage(cfg), extract_dir, args)
        print(summary.format())
        if not summary.ok:
            raise RuntimeError(
                f"extraction of {args.dataset} did not finish; see the summary above"
            )
    elif not check_inputs([extract_dir], args, what="extracted input"):
        raise RuntimeError(f"{extract_dir} is incomplete (see above)")
    codebook = args.data / "codebook"
    if not codebook.exists():
        return extract_dir, None
    from pipelines.core.runner import StageMismatchError
    from pipelines.stages.tokenize import TokenizeStage

    tok_dir = args.data / TOKENIZE_DIR / args.dataset
    try:
        summary = run_with_engine(TokenizeStage(extract_dir, codebook), tok_dir, args)
    except StageMismatchError as exc:  # a refitted codebook, a new extract or an older token layout
        raise RuntimeError(
            f"{exc}; to replace the token table: drivevla tokenize --data {args.data} "
            f"--datasets {args.dataset} --overwrite"
        ) from None
    print(summary.format())
    if not summary.ok:
        raise RuntimeError(f"tokenization of {args.dataset} did not finish; see the summary above")
    return extract_dir, tok_dir


def dry_run(stage, n_show: int, limit: int | None) -> int:  # noqa: ANN001 - AnnotateStage, imported lazily
    """Print the selection counts and ``n_show`` rendered prompts; no request is sent."""
    from annotators.prompts import PromptError, build_prompt
    from annotators.request import request_key
    from annotators.rules import rules_reasoning
    from annotators.selection import decide

    cfg = stage.cfg
    modes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    shown = 0
    for i, row in enumerate(stage.iter_rows()):
        if limit is not None and i >= limit:
            break
        mode, why, score = decide(row, cfg.selection, stage.cutoff)
        modes[mode] += 1
        reasons.update(r.split(":", 1)[0] for r in why)
        if shown >= n_show or (mode == "fast" and not cfg.annotate_fast):
            continue
        shown += 1
        print(
            f"\n##### {row['sample_id']}: {mode} (score {score:.1f}; {', '.join(why) or 'no reasons'})"
        )
        try:
            if cfg.annotator == "rules":
                print(rules_reasoning(row, cfg.prompt))
            else:
                prompt = build_prompt(row, cfg.prompt)
                print(prompt.render())
                print(
                    f"[request key {request_key(prompt, cfg.client)}; {len(prompt.images)} images]"
                )
        except PromptError as exc:
            print(f"cannot build a prompt: {exc}")
    print(
        f"\nselection: {dict(modes)}; reasons: {dict(reasons.most_common())}; cutoff {stage.cutoff}"
    )
    return 0


# Failures that belong to the sample itself (its prompt is too long or cannot be built):
# recorded in the rows and left to the filter stage. Any other failed annotation (429, 5xx,
# timeouts, an unusable answer, a refused key, ...) means work is missing: exit status 1,
# and a rerun of the same command resends exactly those requests.
SAMPLE_ERRORS = frozenset({"ContextTooLong", "PromptError"})


def run(args: argparse.Namespace) -> int:
    from annotators.client import PreflightError
    from annotators.config import AnnotateConfig
    from annotators.lease import LEASE_DIR, LeaseHeld, OutputLease
    from pipelines.stages.annotate import CACHE_DIR, AnnotateStage

    try:
        cfg = load_config(AnnotateConfig, args.config, _overrides(args))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    out = args.data / ANNOTATE_DIR / args.dataset
    try:
        in_dir, tokens_dir = ensure_input(args)
        stage = AnnotateStage(
            in_dir, cfg, out, progress=not args.no_progress, limit=args.limit, tokens_dir=tokens_dir
        )
    except (RuntimeError, FileNotFoundError, ConfigError) as exc:
        log.error("%s", exc)
        return 2
    if args.dry_run:
        return dry_run(stage, args.show, args.limit)
    fs.makedirs(out)
    try:  # one writer per output, also across machines sharing the file system or bucket
        lease = OutputLease(str(out)).acquire()
    except LeaseHeld as exc:
        log.error("%s", exc)
        return 2
    try:
        if args.overwrite:
            for child in out.iterdir():
                if child.name not in (CACHE_DIR, LEASE_DIR):
                    fs.remove_tree(child) if child.is_dir() else child.unlink()
        else:
            reopened = stage.reopen_failed(out)
            if reopened:
                log.info(
                    "resending %d failed requests of %d finished partitions (%s); "
                    "their other rows come from the cache",
                    sum(reopened.values()), len(reopened), ", ".join(sorted(reopened)),
                )  # fmt: skip
        dump_config(cfg, out / "config.yaml")  # holds the key's env var name, never the key
        try:
            stage.preflight()  # in the driver: a missing server is reported before any worker starts
            summary = run_with_engine(stage, out, args)
        except PreflightError as exc:
            log.error("%s", exc)
            return 2
    finally:
        lease.release()
    counts = annotation_counts(out)
    print(format_summary(summary, counts))
    if counts["errors"].get("MalformedAnswer") and cfg.client.guided != "response_format":
        log.warning(
            "%d answers were unusable with client.guided=%s: servers that do not know that field "
            "ignore it and answer unconstrained (current vLLM ignores guided_json, SGLang ignores "
            "structured_outputs); client.guided=response_format is honoured by both",
            counts["errors"]["MalformedAnswer"], cfg.client.guided,
        )  # fmt: skip
    missing = {k: v for k, v in counts["errors"].items() if k not in SAMPLE_ERRORS}
    if missing:
        log.error(
            "%d annotations failed (%s); run the same command again to resend exactly those requests",
            sum(missing.values()), ", ".join(f"{k}: {v}" for k, v in sorted(missing.items())),
        )  # fmt: skip
        return 1
    return 0 if summary.ok else 1


def annotation_counts(out: Path) -> dict[str, Counter[str]]:
    """Rows by think mode, annotation status and error class over the output shards."""
    from pipelines.core.shards import iter_rows, list_shards

    c: dict[str, Counter[str]] = {"modes": Counter(), "status": Counter(), "errors": Counter()}
    if not list_shards(out):
        return c
    for r in iter_rows(out, columns=["think_mode", "annotation_status", "annotation_error"]):
        c["modes"][r["think_mode"]] += 1
        c["status"][r["annotation_status"]] += 1
        if r["annotation_error"]:
            c["errors"][r["annotation_error"].split(":", 1)[0]] += 1
    return c


def format_summary(summary, counts: dict[str, Counter[str]]) -> str:  # noqa: ANN001 - RunSummary
    """The runner's stage summary with the annotation outcomes added (failed annotations are
    written rows, so the runner's own "failed" count, of samples not written, does not see them)."""
    head, _, rest = summary.format().partition("\n")
    st = counts["status"]
    head += (
        f"; annotations: {st.get('ok', 0)} ok, {st.get('failed', 0)} failed, "
        f"{st.get('skipped_fast', 0)} skipped (fast thinking)"
    )
    lines = [head] + ([rest] if rest else [])
    lines += [f"  annotation failed  {cls:<26} {n}" for cls, n in sorted(counts["errors"].items())]
    lines.append(f"  think modes {dict(counts['modes'])}")
    return "\n".join(lines)


def annotation_summary(out: Path) -> str:
    """Counts by think mode, annotation status and error class over the output shards."""
    c = annotation_counts(out)
    if not c["status"]:
        return "annotate: no output rows"
    return (
        f"annotate: think modes {dict(c['modes'])}; status {dict(c['status'])}; "
        f"errors {dict(c['errors']) or 'none'}"
    )
