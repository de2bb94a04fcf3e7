"""Names shared by everything that writes or reads a tracked run.

Training writes these tags and metrics; studies and searches add theirs; the report reads them back.
Keeping the names in one place is what lets a report be rebuilt from any tracking store.
"""

# Tags (strings) set on every training run.
TAG_STUDY = "study"                # study name (absent for a lone `attamba train`)
TAG_TRIAL = "trial"                # run name inside a study, derived from its parameters
TAG_SIZE = "model_size"            # size preset name, e.g. "s60m"
TAG_ATTENTION = "attention"        # the attention module: attamba | full | swa | iso_kv
TAG_KIND = "kind"                  # what the run is, for comparisons: attamba | full | swa | iso_kv | iso_flop
                                   # | iso_param (iso_flop and iso_param runs use the iso_kv module at the
                                   # width F that matches Attamba's FLOPs or parameters: ModelConfig.iso)
TAG_SEGMENTATION = "ssm_segmentation"  # chunk | offset ("" for baselines)
# On Attamba runs: the variant label of the iso baseline of each kind sized from this model at data.seq_len
# (attamba.costs.iso_kv_config / iso_flop_config), so the report pairs each Attamba with its own baseline.
TAG_MATCH = {"iso_kv": "iso_kv_match", "iso_flop": "iso_flop_match"}
TAG_VARIANT = "variant"            # the model variant: ModelConfig.variant(), the one identity that run names,
                                   # tags and report grouping share, e.g. "attamba-P8-L32-cyclic-seg_offset"
TAG_CHUNK = "chunk_size"           # P ("" for baselines)
TAG_LEADING = "leading_tokens"     # L ("" for baselines)
TAG_BOUNDARIES = "boundaries"      # uniform | cyclic | cyclic_released | random ("" for baselines)
TAG_SEED = "seed"
TAG_OPTUNA_TRIAL = "optuna_trial"  # Optuna trial number, on runs made by a search
TAG_STATUS = "run_status"          # finished | failed | running | killed (its process died; ended by a sync)
TAG_RUN_KEY = "run_key"            # the run folder's key (run.json): one MLflow run per run folder, found by it
TAG_CODE_VERSION = "code_version"  # git commit of the checkout ("-dirty" if modified), else the package
                                   # version; on training runs and on the runs they nest under
TAG_ROLE = "study_role"            # "parent" / "search" on the run a study's or search's runs nest under;
                                   # "reference" on a search's transformer reference run
CONTAINER_ROLES = ("parent", "search")  # roles of runs that hold other runs, not results

# Metrics logged per step.
M_LOSS = "train/loss"
M_LR = "train/lr"
M_GRAD_NORM = "train/grad_norm"
M_TOKENS_PER_S = "train/tokens_per_s"
M_FLOPS_PER_S = "train/flops_per_s"  # model FLOPs (attamba.costs) per second, all ranks together
M_MFU = "train/mfu"                  # M_FLOPS_PER_S over the devices' peak dense bf16 rate; only where known

# Metrics logged per evaluation (step = training step); the last one is the run's result.
M_VAL_LOSS = "val/loss"
M_VAL_PPL = "val/ppl"
M_VAL_BPB = "val/bpb"
M_VAL_TOKENS = "val/tokens"        # targets the evaluation scored (the final one scores the whole split)
M_MQAR_PREFIX = "val/mqar_acc_T"   # followed by the context length, e.g. "val/mqar_acc_T256"
# Runs trained on data.source=mqar log val/loss (nats on the answers), val/tokens (answers scored) and, instead
# of ppl and bpb, recall: overall and per key-query distance bucket (lo-hi inclusive, log-spaced: 1-8, 9-32, ...)
M_VAL_RECALL = "val/recall"
RECALL_DISTANCE = "recall_d"       # val/recall_d9-32: recall of the queries 9 to 32 tokens after their key
SPLIT_PREFIXES = {"validation": "val", "test": "test"}   # metric names say their split: val/ppl, test/ppl


def split_metric(split: str, name: str) -> str:
    """The metric `name` ('loss', 'ppl', 'bpb', 'tokens', 'recall') on `split`: split_metric('test', 'ppl') =
    'test/ppl'."""
    return f"{SPLIT_PREFIXES[split]}/{name}"


# Loss by position in the context, logged by every whole-split (final) evaluation: the mean loss of the targets
# whose position (how many tokens the model could see: 1 for a window's first target, seq_len for its last)
# falls in a bucket. Buckets are log-spaced, 1-8, 9-32, 33-128, 129-512, 513-2048, ..., the last one ending at
# seq_len: split_metric("validation", loss_pos_name(9, 32)) = "val/loss_pos_9-32", and per evaluation variant
# eval_variant_metric(label, loss_pos_name(9, 32)) = "evalvar/<label>/loss_pos_9-32".
LOSS_POS_PREFIX = "loss_pos_"
LOSS_POS_FIRST, LOSS_POS_FACTOR = 8, 4     # the first bucket ends at 8; each next one ends 4 times further


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """The (first, last) positions of each bucket, inclusive: position_buckets(256) =
    [(1, 8), (9, 32), (33, 128), (129, 256)]."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    out, first, last = [], 1, LOSS_POS_FIRST
    while first <= seq_len:
        out.append((first, min(last, seq_len)))
        first, last = last + 1, last * LOSS_POS_FACTOR
    return out


def loss_pos_name(first: int, last: int) -> str:
    return f"{LOSS_POS_PREFIX}{first}-{last}"


def parse_loss_pos(name: str) -> tuple[int, int] | None:
    """(first, last) of a name ending in loss_pos_<first>-<last> (a whole metric name or its last part), else None."""
    tail = name.rsplit("/", 1)[-1]
    if not tail.startswith(LOSS_POS_PREFIX):
        return None
    first, sep, last = tail[len(LOSS_POS_PREFIX):].partition("-")
    return (int(first), int(last)) if sep and first.isdigit() and last.isdigit() else None


def recall_distance_metric(split: str, lo: int, hi: int) -> str:
    """Recall of the queries lo..hi tokens after their key: recall_distance_metric('validation', 9, 32) =
    'val/recall_d9-32'."""
    return split_metric(split, f"{RECALL_DISTANCE}{lo}-{hi}")


# Evaluation variants: the trained weights evaluated under another attention setting (other P, L or
# boundaries for Attamba; a sliding window for a transformer). Each has a label, the ModelConfig.variant()
# of the model it was evaluated as, e.g. "attamba-P16-L8-cyclic" or "swa-W33"; per label the run holds
#   tag    eval_variant.<label> = the overrides, e.g. "chunk_size=16" or "attention=swa,window=33"
#   metric evalvar/<label>/<name> for name in EVAL_VARIANT_METRICS (validation split, whole split), and its
#          loss by position, evalvar/<label>/loss_pos_<first>-<last> (position_buckets)
TAG_EVAL_VARIANT_PREFIX = "eval_variant."
M_EVAL_VARIANT_PREFIX = "evalvar/"
EVAL_VARIANT_METRICS = ("loss", "ppl", "bpb", "recall", "kv_cache_bytes", "attn_flops_per_token")  # recall on
                                                                    # MQAR runs only, which have no ppl or bpb


def eval_variant_metric(label: str, name: str) -> str:
    return f"{M_EVAL_VARIANT_PREFIX}{label}/{name}"


# A study scores every full transformer through a window of L + 1 keys (the query included) for each Attamba L
# it runs, and through CONTEXT_WINDOW keys: the report's context use (how much the transformer loses without
# the tokens beyond the window) is read from those evaluation variants, labelled swa-W<keys>.
CONTEXT_WINDOW = 40

# Cost metrics, logged once at step 0 (from attamba.costs).
M_PARAMS = "cost/params"
M_PARAMS_NON_EMB = "cost/params_non_embedding"
M_KV_BYTES_PER_TOKEN = "cost/kv_cache_bytes_per_token"   # asymptotic bytes per cached token, all layers
M_KV_BYTES = "cost/kv_cache_bytes"                       # cache bytes at the evaluation context, all layers
M_ATTN_FLOPS_PER_TOKEN = "cost/attn_flops_per_token"     # mean over positions at the evaluation context
M_TRAIN_FLOPS = "cost/train_flops"                       # total training FLOPs of the run
M_TRAIN_TOKENS = "cost/train_tokens"
M_EVAL_CONTEXT = "cost/eval_context"
