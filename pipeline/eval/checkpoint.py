"""`attamba eval CHECKPOINT`: a saved checkpoint scored on a split, with its evaluation variants, and the
variants' scores logged into the checkpoint's MLflow run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import schema
from pipeline.checkpoints import load_config, load_model, read_manifest
from pipeline.data.loader import num_sequences
from pipeline.data.mqar_source import MQARData
from pipeline.data.prepare import prepare
from pipeline.eval.evaluate import evaluate_model
from pipeline.eval.variants import evaluate_variants, resolve, variant_tags
from pipeline.tracking import identity
from pipeline.tracking.mlflow_client import log_into_run


def evaluate_checkpoint(path, split: str = "validation", paper_metric: bool = False, batch_size: int = 8,
                        device: str = "cpu", paper_tail: int | None = None, variants=()) -> dict:
    """`attamba eval CHECKPOINT`: every token of `split`, plus the paper metric and MQAR if asked, and the
    evaluation `variants` (checked mappings, attamba.variants) on the validation split.

    paper_tail: tokens kept from each document's end for the paper metric; default the config's
    eval.paper_tail, capped at the model's max_seq_len (the paper: 1023 at sequence length 1024).
    With variants, the result's "eval_variant_tags" holds the tags a tracked run gets for them."""
    if variants and split != "validation":
        raise ValueError(f"--variant scores the validation split, but --split={split!r}; evaluate the variants "
                         f"without --split {split}")
    model, cfg, tokenizer = load_model(path, device)
    resolved = resolve(cfg.model, variants)   # a shape-changing variant fails here, before any evaluation
    tail = paper_tail if paper_tail is not None else min(cfg.eval.paper_tail, cfg.model.max_seq_len)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, paper_tail=tail))
    data = prepare(cfg.data, max_seq_len=cfg.model.max_seq_len)
    if paper_metric and isinstance(data, MQARData):
        raise ValueError(f"--paper-metric scores text documents; {str(path)!r} was trained on data.source="
                         f"{cfg.data.source} (its evaluation is recall): run it without --paper-metric")
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if not isinstance(data, MQARData) and fingerprint != data.tokenizer.fingerprint:
        raise ValueError(f"checkpoint {str(path)!r} was trained with another tokenizer than data.tokenizer="
                         f"{cfg.data.tokenizer!r} now builds; evaluate with the checkpoint's data settings")
    metrics = evaluate_model(model, data, cfg.eval, batch_size, device, full=True, split=split,
                             paper=paper_metric or cfg.eval.paper_metric)
    metrics["n_sequences"] = (len(data.examples(split).inputs) if isinstance(data, MQARData)
                              else num_sequences(len(data.tokens(split)), cfg.data.seq_len))
    if resolved:
        metrics.update(evaluate_variants(model.state_dict(), resolved, data, batch_size, device))
        metrics["eval_variant_tags"] = variant_tags(resolved)
    return metrics


def log_variants(checkpoint: Path, metrics: dict, no_log: bool) -> str:
    """Log the evaluation variants into the checkpoint's MLflow run where there is one; one line saying
    what was done."""
    if no_log:
        return "evaluation variants not logged (--no-log)"
    folder = checkpoint.parent.parent   # <out_dir>/checkpoints/step_N
    known = identity.read(identity.path_in(folder))
    if known is None and (folder / identity.LEGACY_RUN_ID_FILE).is_file():   # a folder made before run.json
        known = identity.RunFile(key="", mlflow_run_id=(folder / identity.LEGACY_RUN_ID_FILE).read_text().strip())
    if known is None or not known.mlflow_run_id:
        return (f"evaluation variants not logged: no MLflow run recorded in {str(identity.path_in(folder))!r} "
                f"(`attamba sync {folder}` delivers a run that waits in its journal)")
    run_id = known.mlflow_run_id
    step = read_manifest(checkpoint)["step"]
    values = {k: v for k, v in metrics.items() if k.startswith(schema.M_EVAL_VARIANT_PREFIX)}
    uri = known.uri or load_config(checkpoint).tracking.uri
    why, kept = log_into_run(run_id, values, metrics["eval_variant_tags"], step, uri)
    if why:
        return f"evaluation variants not logged into MLflow run {run_id}: {why}"
    already = len(values) - kept
    return (f"evaluation variants logged into MLflow run {run_id} at step {step}"
            + (f" ({already} metric(s) it already held at that step kept as they were)" if already else ""))
