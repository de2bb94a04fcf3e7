"""The `attamba` command: parse, build, run, close. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import errno
import json
import math
import numbers
import os
import sys

EPILOG = """examples:
  attamba study configs/studies/quickstart.yaml        # the main job: a small grid, tracked and reported
  attamba train configs/train_tiny.yaml train.steps=300 model.chunk_size=4
  attamba search configs/search/pl_tradeoff.yaml
  attamba report --experiment quickstart --out reports/quickstart
  attamba bench attention --seq-len 4096 --chunk-size 8 --leading-tokens 32
  mlflow ui --backend-store-uri sqlite:///mlflow.db    # browse every run
"""


def _finite(value):
    """`value` with every NaN or infinite float (numpy's too) replaced by None, for strict JSON."""
    if isinstance(value, dict):
        return {key: _finite(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):  # numpy floats too
        return float(value) if math.isfinite(value) else None
    return value


def _print_json(obj, indent: int | None = 2) -> None:
    """Strict JSON on stdout (no NaN or Infinity, which `json.loads` of other languages refuses): a
    non-finite number is printed as null."""
    print(json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False))


def _say_ui(result: dict, what: str) -> None:
    """Where the MLflow UI shows the result (result["mlflow_ui"], from tracking.ui), as a line on stderr."""
    from pipeline.tracking.ui import ui_line

    line = ui_line(result.get("mlflow_ui"), what)
    if line:
        print(line, file=sys.stderr)


def _world_size() -> int:
    """Ranks of this run: the launcher's WORLD_SIZE (torchrun, deepspeed), else 1."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def cmd_train(args) -> int:
    from pipeline.config import RUN_HINT, run_config_from_dict
    from pipeline.loader import load_yaml
    from pipeline.preflight import check_run, validating

    with validating(f"config file {args.config!r}"):
        given = load_yaml(args.config, args.overrides, kind="config", hint=RUN_HINT)
        cfg = run_config_from_dict(given)
        check_run(cfg, given=given, yes=args.yes, world=_world_size())
    from pipeline.tracking.config import resolve_uri
    from pipeline.tracking.mlflow_client import run_links
    from pipeline.train.loop import train

    result = train(cfg, restart=args.restart)
    if cfg.tracking.enabled:
        result = {**result, "mlflow_ui": run_links(resolve_uri(cfg.tracking.uri), result.get("run_id"))}
    _print_json(result)
    _say_ui(result, "run")
    return 0


def _checkpoint(path: str):
    """The checkpoint `path` names (a run folder: its latest), its data settings checked and its cache place."""
    from pipeline.preflight import check_places
    from pipeline.data.checks import check_data
    from pipeline.checkpoints import load_config

    checkpoint = _resolve(path)
    cfg = load_config(checkpoint)
    check_data(cfg.data)
    check_places(cfg, tracking=False, out_dir=False)
    return checkpoint


def cmd_eval(args) -> int:
    from pipeline.preflight import arguments, validating

    with validating("the arguments"):
        arguments.check_eval(args)
        if args.lm_eval:
            checkpoint = _resolve(args.checkpoint)
        else:
            from pipeline.eval.variants import parse_variant

            variants = [parse_variant(text) for text in args.variant]   # bad ones fail before the model is loaded
            checkpoint = _checkpoint(args.checkpoint)
    if args.lm_eval:
        from pipeline.eval.harness import run_lm_eval

        _print_json(run_lm_eval(checkpoint, args.lm_eval.split(","), include_path=args.include_path, limit=args.limit))
        return 0
    from pipeline.eval.checkpoint import evaluate_checkpoint, log_variants

    metrics = evaluate_checkpoint(checkpoint, split=args.split, paper_metric=args.paper_metric,
                                  paper_tail=args.paper_tail, variants=variants)
    _print_json(metrics)
    if variants:
        print(log_variants(checkpoint, metrics, args.no_log), file=sys.stderr)
    return 0


def generate_from_checkpoint(checkpoint, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                             out=sys.stdout, compile: bool = False) -> str:
    """Stream a continuation of `prompt` from a checkpoint through the compressed KV-cache; returns the text."""
    from attamba.generate import generate
    from pipeline.checkpoints import load_model, resolve_checkpoint

    model, cfg, tokenizer = load_model(resolve_checkpoint(checkpoint))
    if tokenizer is None:
        raise ValueError(f"{checkpoint} was trained on data.source={cfg.data.source}, whose tokens are not text; "
                         f"score it with `attamba eval {checkpoint}` instead")
    model.compile_decoding(compile)
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new: list[int] = []
    shown = 0

    def stream(_index: int, token: int) -> None:
        # Decode the whole continuation each time: a multi-byte character can span several tokens.
        nonlocal shown
        new.append(token)
        text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        if not text.endswith("\ufffd"):
            out.write(text[shown:])
            out.flush()
            shown = len(text)

    out.write(prompt)
    generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             eos_id=tokenizer.eos_id, stream=stream)
    text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
    out.write(text[shown:] + "\n")
    return prompt + text


def cmd_generate(args) -> int:
    from pipeline.preflight import arguments, validating

    with validating("the arguments"):
        arguments.check_generate(args)
        checkpoint = _resolve(args.checkpoint)
    generate_from_checkpoint(checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             compile=args.compile)
    return 0


def _resolve(path: str):
    from pipeline.preflight import paths
    from pipeline.checkpoints import resolve_checkpoint

    paths.resolve("checkpoint", path, inside=False)
    return resolve_checkpoint(path)


def _exit_code(command: str, result: dict, complete: bool = True) -> int:
    """0 when every run finished; 1 when any failed (or a search ended short of n_trials), said on stderr."""
    failed = list(result.get("failed") or [])
    if not failed and complete:
        return 0
    shown = ", ".join(map(str, failed[:5])) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    what = f"{len(failed)} run(s) failed ({shown})" if failed else "fewer trials complete than n_trials"
    print(f"attamba {command}: {what}; the JSON lists what finished and what failed; run the same command again "
          f"to retry", file=sys.stderr)
    return 1


def cmd_study(args) -> int:
    from pipeline.study.driver import run_study

    result = run_study(args.config, args.overrides, address=args.address, yes=args.yes)
    _print_json(result)
    _say_ui(result, "study's parent run, its description the answer")
    return _exit_code("study", result)


def cmd_search(args) -> int:
    from pipeline.search.driver import run_search

    result = run_search(args.config, args.overrides, address=args.address, yes=args.yes)
    _print_json(result)
    _say_ui(result, "search's parent run")
    return _exit_code("search", result, complete=result["complete"] >= result["n_trials"])


def cmd_report(args) -> int:
    from pipeline.preflight import arguments, validating

    with validating("the arguments"):
        out = arguments.check_report(args)
    from pipeline.report import make_report

    from pipeline.study.driver import PARENT_ROLE
    from pipeline.tracking.config import resolve_uri
    from pipeline.tracking.parent import find_parent

    if args.runs:   # a saved runs.csv: no MLflow store to read or to describe
        result = make_report(args.experiment, out, runs_file=args.runs)
        parent = None
    else:
        uri = resolve_uri(args.tracking_uri)
        result = make_report(args.experiment, out, tracking_uri=uri)
        parent = find_parent(uri, args.experiment, PARENT_ROLE)
    if parent is not None:   # a study's: its description is the answer of the latest report
        parent.describe(result.description)
    _print_json({"experiment": args.experiment or result.claims.get("experiment"), "report": str(out / "report.html"),
                 "files": {name: str(path) for name, path in result.files.items()}, "runs": result.n_runs,
                 "usable": result.n_ok, "failed": result.failed, "missing": result.missing,
                 "answer": result.headline, "parent_run_id": parent.run_id if parent else None})
    print(f"report written to {out / 'report.html'}", file=sys.stderr)
    return 0


def cmd_sync(args) -> int:
    from pipeline.preflight import arguments, validating

    with validating("the arguments"):
        arguments.check_sync(args)
    from pipeline.tracking import sync_journal

    result = sync_journal(args.dir, uri=args.tracking_uri)
    _print_json(result)
    print(f"delivered {result['delivered']} records from {result['journals']} journals in "
          f"{len(result['folders'])} folders; {result['pending']} still pending, {result['busy']} busy (a live run), "
          f"{result['failed']} unreachable, {result['quarantined']} unreadable lines quarantined, "
          f"{result['skipped']} metric points MLflow already held, {result['killed']} abandoned runs ended KILLED",
          file=sys.stderr)
    # 1: something was left undelivered (the store unreachable, or a run it cannot take yet); busy journals
    # belong to live runs, which deliver them themselves
    return 1 if result["failed"] or result["pending"] else 0


def cmd_bench(args) -> int:
    from pipeline.preflight import arguments, validating

    with validating("the arguments"):
        arguments.check_bench(args)
    import torch

    dtype = getattr(torch, args.dtype)
    if args.what == "attention":
        from pipeline.bench.attention import bench_attention

        result = bench_attention(args.seq_len, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                                 repeats=args.repeats, device=args.device, dtype=dtype, heads=args.heads,
                                 reference=args.reference)
    elif args.what == "train-step":
        from pipeline.bench.train_step import TrainStepBench, bench_train_step

        bench = TrainStepBench(seq_len=args.seq_len, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                               repeats=args.repeats, dim=args.dim, n_layers=args.layers, batch=args.batch,
                               size=args.size)
        result = bench_train_step(bench, device=args.device, autocast=None if dtype == torch.float32 else dtype)
    elif args.what == "matvec":
        from pipeline.bench.matvec import bench_matvec

        result = bench_matvec(rounds=args.repeats, compile=args.compile)
    else:
        from pipeline.bench.decode import DecodeBench, bench_decode

        bench = DecodeBench(context=args.context, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                            batch=args.batch, new_tokens=args.new_tokens)
        result = bench_decode(bench, compile=args.compile)
    _print_json(result, indent=None)   # one line, strict like every other subcommand's JSON
    return 0


YES_HELP = "start even when the planned training needs more than a day at the most this machine can do"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each help text ends with its default when it has one (an option's or an
    optional positional's value other than None or False) and does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        takes_default = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if (not takes_default or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)"


def _command(sub, name: str, text: str, func) -> argparse.ArgumentParser:
    """A subcommand whose one-line `text` is both its entry in `attamba --help` and its own description."""
    p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                       formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attamba", description="Attamba scaling studies: train, evaluate, "
                                     "schedule studies on Ray, search P/L with Optuna, report.",
                                     epilog=EPILOG, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", "train one model from a YAML config (DeepSpeed)", cmd_train)
    p.add_argument("config", help="run YAML, e.g. configs/train_tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    p.add_argument("--yes", action="store_true", help=YES_HELP)
    p.add_argument("--restart", action="store_true",
                   help="start the run folder over instead of resuming it: its checkpoints, metrics, run file and "
                   "journals move into OUT_DIR/restarted/<time>/ and the run gets a new MLflow run (default: resume "
                   "from the newest valid checkpoint, which is refused when the model, data, optimizer or batch "
                   "settings changed)")

    p = _command(sub, "eval", "evaluate a checkpoint: perplexity, bits per byte, or lm-eval tasks", cmd_eval)
    p.add_argument("checkpoint", help="a run's out_dir (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--split", default="validation", choices=["validation", "test"], help="the split evaluated")
    p.add_argument("--paper-metric", action="store_true", help="also the paper's per-token ppl on document tails")
    p.add_argument("--paper-tail", type=int, help="tokens kept from each document's end (default: "
                   "eval.paper_tail capped at the model's max_seq_len)")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (default: none: "
                   "perplexity and bits per byte)")
    p.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,...]",
                   help="also evaluate the weights under another attention setting, e.g. chunk_size=16 or "
                   "boundaries=random,leading_tokens=4 (Attamba) or window=33 (transformers); repeatable, "
                   "logged into the checkpoint's MLflow run")
    p.add_argument("--no-log", action="store_true", help="print the --variant results without logging them")
    p.add_argument("--include-path", help="folder of extra lm-eval task YAMLs (default: none)")
    p.add_argument("--limit", type=int, help="examples per lm-eval task (default: all)")

    p = _command(sub, "generate", "stream text from a checkpoint with the compressed KV-cache", cmd_generate)
    p.add_argument("checkpoint", help="a run's out_dir (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens generated after the prompt")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature; 0 picks the most likely token (greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile: faster per token at small batch, compiles first (seconds)")

    for name, func, text in (("study", cmd_study, "run a study grid on Ray Tune and write its report"),
                             ("search", cmd_search, "multi-objective Optuna search over P and L")):
        p = _command(sub, name, text, func)
        example = "configs/studies/quickstart.yaml" if name == "study" else "configs/search/pl_tradeoff.yaml"
        p.add_argument("config", help=f"{name} YAML, e.g. {example}")
        p.add_argument("overrides", nargs="*", help="key.path=value overrides")
        p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else the file's address, else "
                       "a local Ray)")
        p.add_argument("--yes", action="store_true", help=YES_HELP)

    p = _command(sub, "report", "scaling-law and trade-off report of an MLflow experiment", cmd_report)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--experiment", help="the MLflow experiment: a study's or search's name")
    source.add_argument("--runs", help="a runs.csv an earlier report wrote: the report rebuilt from it, without "
                        "the MLflow store")
    p.add_argument("--out", help="output folder (default: reports/EXPERIMENT)")
    p.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = _command(sub, "sync", "upload metrics journaled while the tracking server was unreachable", cmd_sync)
    p.add_argument("dir", help="a run's folder or its tracking/ folder, or a study or search folder: every "
                   "journal below it is delivered")
    p.add_argument("--tracking-uri", help="the MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")

    p = _command(sub, "bench", "benchmarks that print one JSON object with same-run ratios", cmd_bench)
    p.add_argument("what", choices=["attention", "train-step", "decode", "matvec"], help="what to time")
    p.add_argument("--seq-len", type=int, default=4096, help="attention, train-step: sequence length")
    p.add_argument("--context", type=int, default=4096, help="decode: context length")
    p.add_argument("--chunk-size", type=int, default=8, help="Attamba's chunk size P")
    p.add_argument("--leading-tokens", type=int, default=32, help="Attamba's leading tokens L")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (matvec: rounds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="attention, train-step: where to run")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="attention: q/k/v dtype; train-step: autocast dtype (parameters stay float32)")
    p.add_argument("--dim", type=int, default=512, help="train-step: model width")
    p.add_argument("--layers", type=int, default=4, help="train-step: number of layers")
    p.add_argument("--size", help="train-step: a size preset (e.g. s125m) instead of --dim/--layers")
    p.add_argument("--heads", type=int, default=8, help="attention: number of heads")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="attention: also time the dense T x T mask reference (--no-reference skips it)")
    p.add_argument("--batch", type=int, default=1, help="train-step, decode: sequences per step")
    p.add_argument("--new-tokens", type=int, default=64, help="decode: tokens generated (timed) per sequence")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode: both models decode through torch.compile, compiled during the untimed warm-up; "
                   "matvec: also time the compiled product (default: on where a C++ compiler is found; "
                   "--no-compile: eager PyTorch only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 1 a study or search with failed runs (its JSON lists them), a sync that left records
    undelivered, or a full disk (one line naming the folder and the bytes needed and free); 2 bad input (one
    line on stderr, nothing written or started); 130 interrupted. An unexpected error after the checks (a bug)
    keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        # Config and input errors (and runtime refusals the user acts on): one clear line, no traceback.
        from pipeline.preflight.phase import one_line

        print(f"attamba {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # A full disk: one line naming the file or folder (a checkpoint's says the bytes needed and free).
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc.strerror) else ""
        print(f"attamba {args.command}: error: {exc.strerror}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"attamba {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
