"""The `attamba` command: parse, build, run, close. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
from pathlib import Path

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


def _print_json(obj) -> None:
    """Strict JSON on stdout (no NaN or Infinity, which `json.loads` of other languages refuses): a
    non-finite number is printed as null."""
    print(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


def cmd_train(args) -> int:
    from pipeline.config import load_run_config
    from pipeline.train.loop import train

    cfg = load_run_config(args.config, args.overrides)
    _print_json(train(cfg))
    return 0


def cmd_eval(args) -> int:
    if args.lm_eval and args.variant:
        raise ValueError("--variant scores perplexity under another attention setting; run it without --lm-eval")
    if args.lm_eval:
        from pipeline.eval.harness import run_lm_eval
        from pipeline.train.checkpoint import resolve_checkpoint

        _print_json(run_lm_eval(resolve_checkpoint(args.checkpoint), args.lm_eval.split(","), include_path=args.include_path,
                                limit=args.limit))
        return 0
    from pipeline.train.checkpoint import resolve_checkpoint
    from pipeline.eval.evaluate import evaluate_checkpoint
    from pipeline.eval.variants import parse_variant

    variants = [parse_variant(text) for text in args.variant]   # bad ones fail before the model is loaded
    checkpoint = resolve_checkpoint(args.checkpoint)
    metrics = evaluate_checkpoint(checkpoint, split=args.split, paper_metric=args.paper_metric,
                                  paper_tail=args.paper_tail, variants=variants)
    _print_json(metrics)
    if variants:
        print(_log_variants(checkpoint, metrics, args.no_log), file=sys.stderr)
    return 0


def _log_variants(checkpoint: Path, metrics: dict, no_log: bool) -> str:
    """Log the evaluation variants into the checkpoint's MLflow run where there is one; one line saying
    what was done."""
    from pipeline import schema
    from pipeline.train.checkpoint import MANIFEST, load_config
    from pipeline.train.run_tracking import RUN_ID_FILE
    from pipeline.tracking.mlflow_client import log_into_run

    if no_log:
        return "evaluation variants not logged (--no-log)"
    id_file = checkpoint.parent.parent / RUN_ID_FILE   # <out_dir>/checkpoints/step_N
    if not id_file.is_file():
        return f"evaluation variants not logged: no {RUN_ID_FILE} in the run folder {str(id_file.parent)!r}"
    run_id = id_file.read_text().strip()
    step = json.loads((checkpoint / MANIFEST).read_text())["step"]
    values = {k: v for k, v in metrics.items() if k.startswith(schema.M_EVAL_VARIANT_PREFIX)}
    uri = load_config(checkpoint).tracking.uri
    why = log_into_run(run_id, values, metrics["eval_variant_tags"], step, uri)
    if why:
        return f"evaluation variants not logged into MLflow run {run_id}: {why}"
    return f"evaluation variants logged into MLflow run {run_id} at step {step}"


def generate_from_checkpoint(checkpoint, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                             out=sys.stdout, compile: bool = False) -> str:
    """Stream a continuation of `prompt` from a checkpoint through the compressed KV-cache; returns the text."""
    from attamba.generate import generate
    from pipeline.train.checkpoint import load_model, resolve_checkpoint

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
    generate_from_checkpoint(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                             compile=args.compile)
    return 0


def cmd_study(args) -> int:
    from pipeline.study.driver import run_study

    _print_json(run_study(args.config, args.overrides, address=args.address))
    return 0


def cmd_search(args) -> int:
    from pipeline.search.driver import run_search

    _print_json(run_search(args.config, args.overrides, address=args.address))
    return 0


def cmd_report(args) -> int:
    from pipeline.report import make_report

    out = Path(args.out or f"reports/{args.experiment}")
    result = make_report(args.experiment, out, tracking_uri=args.tracking_uri)
    print(f"report written to {out / 'report.html'}")
    return 0 if result is not None else 1


def cmd_sync(args) -> int:
    from pipeline.tracking import sync_journal

    result = sync_journal(args.dir, uri=args.tracking_uri)
    _print_json(result)
    print(f"delivered {result['delivered']} records from {result['journals']} journals in "
          f"{len(result['folders'])} folders; {result['pending']} still pending, {result['busy']} busy (a live run), "
          f"{result['failed']} unreachable, {result['quarantined']} unreadable lines quarantined", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible here; use --device cpu")
    if args.what in ("decode", "matvec") and (args.device != "cpu" or args.dtype != "float32"):
        raise ValueError(f"bench {args.what} measures the CPU float32 decode path; drop --device/--dtype")
    dtype = getattr(torch, args.dtype)
    if args.what == "attention":
        from pipeline.bench.attention import bench_attention

        result = bench_attention(args.seq_len, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                                 repeats=args.repeats, device=args.device, dtype=dtype, heads=args.heads,
                                 reference=args.reference)
    elif args.what == "train-step":
        from pipeline.bench.train_step import bench_train_step

        result = bench_train_step(args.seq_len, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                                  repeats=args.repeats, device=args.device, dim=args.dim, n_layers=args.layers,
                                  batch=args.batch, autocast=None if dtype == torch.float32 else dtype,
                                  size=args.size)
    elif args.what == "matvec":
        from pipeline.bench.matvec import bench_matvec

        result = bench_matvec(rounds=args.repeats, compile=args.compile)
    else:
        from pipeline.bench.decode import bench_decode

        result = bench_decode(args.context, chunk_size=args.chunk_size, leading_tokens=args.leading_tokens,
                              batch=args.batch, new_tokens=args.new_tokens, compile=args.compile)
    print(json.dumps(result))
    return 0


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

    p = _command(sub, "report", "scaling-law and trade-off report of an MLflow experiment", cmd_report)
    p.add_argument("--experiment", required=True, help="the MLflow experiment: a study's or search's name")
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        # Config and input errors: one clear line, no traceback.
        print(f"attamba {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attamba {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
