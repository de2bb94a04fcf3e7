"""Scoring evaluation variants: the trained weights loaded (strictly) into the model built under another
attention setting (attamba.variants), scored on the whole validation split, with that setting's costs.

Per variant the run gets the tag schema.TAG_EVAL_VARIANT_PREFIX + label = the changed fields and the
metrics schema.eval_variant_metric(label, name); label = ModelConfig.variant() of the evaluated-as model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import yaml

from attamba import costs
from attamba.config import ModelConfig
from attamba.model import AttambaLM
from attamba.variants import changed_fields, check_same_shapes, check_variant, evaluated_as

from pipeline import schema, yamlio
from pipeline.data.mqar_source import MQARData
from pipeline.eval.evaluate import evaluate_split
from pipeline.eval.mqar import recall

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalVariant:
    label: str            # ModelConfig.variant() of the evaluated-as model
    overrides: str        # the fields it changes, "chunk_size=16" or "attention=swa,window=33"
    model: ModelConfig    # the model the weights are evaluated as


def parse_variant(text: str) -> dict:
    """One `--variant` argument, "chunk_size=16,boundaries=random" (a "model." prefix is accepted), checked."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--variant {text!r}: {item!r} is not field=value; write e.g. "
                             f"--variant chunk_size=16,leading_tokens=4")
        try:
            out[key.strip()] = yamlio.parse(value.strip())
        except yaml.YAMLError as exc:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:120]
            raise ValueError(f"--variant {text!r}: the value of {key.strip()} is not a YAML value ({problem}); write "
                             f"e.g. --variant chunk_size=16,boundaries=random") from None
    return check_variant(out, "--variant")


def resolve(model: ModelConfig, variants) -> list[EvalVariant]:
    """The variants (checked mappings) that apply to a run of `model`, with their labels; one log line for
    each skipped one. Raises before any compute if one would change a parameter shape."""
    out, seen = [], {model.variant()}
    for overrides in variants:
        new = evaluated_as(model, overrides)
        if new is None:
            log.info("evaluation variant %s does not apply to a %s run; skipped", overrides, model.attention)
            continue
        label, changed = new.variant(), changed_fields(model, new)
        if label in seen or not changed:
            log.info("evaluation variant %s is %s, already evaluated; skipped", overrides, label)
            continue
        check_same_shapes(model, new, f"evaluation variant {changed}")
        seen.add(label)
        out.append(EvalVariant(label, changed, new))
    return out


def variant_tags(resolved: list[EvalVariant]) -> dict[str, str]:
    return {schema.TAG_EVAL_VARIANT_PREFIX + v.label: v.overrides for v in resolved}


def load_as(weights: dict, cfg: ModelConfig, dtype=torch.float32, device="cpu") -> AttambaLM:
    """AttambaLM(cfg) holding `weights` (strict: every name and shape must match), in eval mode; built on
    the meta device, so no time is spent on an initialisation that is overwritten."""
    with torch.device("meta"):
        model = AttambaLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def evaluate_variants(weights: dict, resolved: list[EvalVariant], data, batch_size: int = 8,
                      device="cpu") -> dict[str, float]:
    """evalvar/<label>/{loss,ppl,bpb,kv_cache_bytes,attn_flops_per_token} and the loss by position
    (evalvar/<label>/loss_pos_<first>-<last>) of each variant: the trained `weights` (a state dict) loaded
    strictly into the evaluated-as model, every token of the validation split, costs at data.config.seq_len.
    On an MQAR source: loss, recall and recall by key-query distance (evalvar/<label>/recall_d<lo>-<hi>) instead
    of ppl, bpb and the loss by position."""
    out = {}
    dtype = next(w.dtype for w in weights.values() if w.is_floating_point())
    context = data.config.seq_len
    for variant in resolved:
        evaluated = load_as(weights, variant.model, dtype, device)
        log.info("evaluating variant %s (%s)", variant.label, variant.overrides)
        if isinstance(data, MQARData):
            res = recall(evaluated, data.examples("validation"), batch_size, device)
            values = {"loss": res["loss"], "recall": res["recall"],
                      **{f"{schema.RECALL_DISTANCE}{lo}-{hi}": right / count
                         for (lo, hi), (right, count) in res["buckets"].items()}}
        else:
            res = evaluate_split(evaluated, data, "validation", batch_size, 0, device)
            values = {"loss": res["loss"], "ppl": res["ppl"], "bpb": res["bpb"], **res["by_position"]}
        values.update(kv_cache_bytes=float(costs.kv_cache_bytes(variant.model, context)),
                      attn_flops_per_token=float(costs.attention_flops(variant.model, context)["per_token"]))
        out.update({schema.eval_variant_metric(variant.label, k): v for k, v in values.items()})
        del evaluated
    return out
