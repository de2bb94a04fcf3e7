"""The options of the commands that take no config file (eval, generate, report, sync, bench), checked
before anything is loaded, written or started; each check raises one ValueError naming the option."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from attamba.checks import at_least, integer, number, one_of, seed, text
from attamba.presets import PRESETS

from pipeline.config import memory_bytes
from pipeline.preflight import paths
from pipeline.preflight.machine import check_device
from pipeline.tracking.config import check_uri

MAX_NEW_TOKENS = 1 << 20   # generate --max-new-tokens: a million tokens is already hours of decoding on a CPU

# bench: the largest value each size option takes (beyond them a benchmark runs for hours or out of memory)
BENCH_LIMITS = {"seq_len": 1 << 20, "context": 1 << 20, "chunk_size": 1 << 20, "leading_tokens": 1 << 20,
                "repeats": 1000, "dim": 1 << 16, "layers": 1024, "heads": 1024, "batch": 1 << 12,
                "new_tokens": 1 << 16}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # ValueError: a module whose __spec__ is None (a stub in sys.modules)
        return False


def check_eval(args) -> None:
    """`attamba eval`'s options (the checkpoint is the command's to resolve)."""
    if args.lm_eval and args.variant:
        raise ValueError("--variant scores perplexity under another attention setting; run it without --lm-eval")
    at_least("--limit", args.limit, 1, integer=True, or_none=True, fix="examples per lm-eval task")
    at_least("--paper-tail", args.paper_tail, 2, integer=True, or_none=True, fix="tokens kept from each document's end")
    if args.lm_eval is None and (args.include_path is not None or args.limit is not None):
        raise ValueError("--include-path and --limit apply to --lm-eval tasks; add --lm-eval TASKS or drop them")
    if args.include_path is not None:
        paths.input_folder("--include-path", args.include_path)
    if args.lm_eval is not None:
        for task in args.lm_eval.split(","):
            text("--lm-eval", task, fix="comma-separated task names, e.g. --lm-eval arc_easy,hellaswag")
        if not _installed("lm_eval"):
            raise ValueError("--lm-eval needs lm-evaluation-harness, which is not installed here; pip install -e "
                             "'.[lm-eval]' (or pip install lm-eval), or evaluate perplexity without --lm-eval")


def check_generate(args) -> None:
    """`attamba generate`'s options."""
    text("--prompt", args.prompt.replace("\n", " ").replace("\t", " "), fix="the text to continue")
    at_least("--max-new-tokens", args.max_new_tokens, 1, integer=True)
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"--max-new-tokens must be at most {MAX_NEW_TOKENS}, got {args.max_new_tokens}; "
                         f"generate in several calls")
    number("--temperature", args.temperature, finite=True)
    at_least("--temperature", args.temperature, 0, fix="0 picks the most likely token")
    at_least("--top-k", args.top_k, 1, integer=True, or_none=True)
    if args.top_p is not None and not (0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}; e.g. 0.9")
    seed("--seed", args.seed)


def check_report(args) -> Path:
    """`attamba report`'s options; returns the report folder (absolute)."""
    if args.runs is not None:
        text("--runs", args.runs, fix="the path of a runs.csv an earlier report wrote")
        if not Path(args.runs).is_file():
            raise ValueError(f"--runs={args.runs!r}: no such file; give the runs.csv an earlier report wrote")
        if args.tracking_uri is not None:
            raise ValueError("--tracking-uri names an MLflow store, but --runs reads a saved runs.csv instead; "
                             "give one of them")
        default = f"reports/{Path(args.runs).resolve().parent.name}"
    else:
        text("--experiment", args.experiment, fix="the MLflow experiment: a study's or search's name")
        default = f"reports/{args.experiment}"
    out = paths.output_dir("--out" if args.out else "--out (default reports/EXPERIMENT)", args.out or default)
    if args.tracking_uri is not None:
        check_uri("--tracking-uri", args.tracking_uri)
        paths.database_url("--tracking-uri", args.tracking_uri)
    return out


def check_sync(args) -> None:
    """`attamba sync`'s options."""
    paths.input_folder("DIR", args.dir)
    if args.tracking_uri is not None:
        check_uri("--tracking-uri", args.tracking_uri)


def check_bench(args) -> None:
    """`attamba bench`'s options: sizes within BENCH_LIMITS, the device, a dense reference that fits in memory."""
    for name, high in BENCH_LIMITS.items():
        integer(f"--{name.replace('_', '-')}", getattr(args, name), 0 if name == "leading_tokens" else 1, high)
    if args.size is not None:
        one_of("--size", args.size, PRESETS)
    check_device("--device", args.device)
    if args.what in ("decode", "matvec") and (args.device != "cpu" or args.dtype != "float32"):
        raise ValueError(f"bench {args.what} measures the CPU float32 decode path; drop --device/--dtype")
    if args.what == "attention" and args.reference:
        need = 4 * args.batch * args.heads * args.seq_len**2   # the dense reference's float32 T x T scores
        if need > memory_bytes() // 2:
            raise ValueError(f"--seq-len={args.seq_len}: the dense T x T reference needs {need / 2**30:.3g} GiB for "
                             f"its scores alone, more than half this machine's memory; add --no-reference or lower "
                             f"--seq-len")
