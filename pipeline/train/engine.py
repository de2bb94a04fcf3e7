"""The pieces `train` assembles: the process group, the DeepSpeed config, AdamW and its LR schedule.

The optimizer is torch's AdamW handed to DeepSpeed rather than DeepSpeed's own "AdamW" config type:
that one resolves to FusedAdam (CUDA only) or to cpu_adam, a C++ op JIT-compiled on first use (minutes
on these 2 cores). ZeRO 1-3 wrap any torch optimizer, and the step is the same on CPU and GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys

import torch
import torch.distributed as dist

from pipeline.config import RunConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world_size). Reuses a group made by Ray Train or a launcher (torchrun, deepspeed set RANK
    etc.); a plain `python` process gets a single-rank group on a free local port."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.sequences_per_step(world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # GuardedAdamW is torch AdamW plus a finiteness check
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }


def any_nonfinite(tensors: list[torch.Tensor], also: bool = False, device: torch.device | None = None) -> bool:
    """True when any element of any tensor is NaN or infinite, or `also` is true, on any rank.

    The max-abs norms of all tensors of one dtype come from one multi-tensor kernel on their device
    (a finite value cannot overflow a max, unlike a sum of squares); then one all-reduce across ranks and
    a single host synchronisation. `device` places the flag when `tensors` is empty (a rank may hold no
    gradient)."""
    if tensors:
        by_dtype = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        finite = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all() for group in by_dtype.values()]
        bad = (~torch.stack(finite).all()).float()
    else:
        bad = torch.zeros((), device=device)
    if also:
        bad = torch.ones_like(bad)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item())


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips its update when any rank saw a non-finite gradient (or a non-finite loss).

    `step()` returns True when it skipped: no parameter or moment changed, the gradients were dropped.
    DeepSpeed calls `step` inside `engine.step()` (under ZeRO 1/2 once per parameter group, on each
    rank's partition, hence the all-reduce), so the loop calls `engine_step(engine, bad_loss=...)`, which
    runs `engine.step()` and returns whether the optimizer step was skipped by this optimizer or by
    DeepSpeed. `overflow` is kept only for DeepSpeed: at ZeRO stage 0 the engine reads that attribute to
    count the step as skipped and hold the LR schedule, as for an fp16 overflow.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.overflow = False      # read by DeepSpeed's engine after each step
        self._bad_loss = False     # set for the duration of one `engine_step`
        self._skipped = False      # whether a `step` call inside the current `engine_step` skipped

    def _device(self) -> torch.device:
        return next(p.device for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure=None, *, bad_loss: bool | None = None) -> bool:
        """One AdamW update, or none when a gradient here or on another rank is non-finite, or `bad_loss`
        (default: what `engine_step` was given) is true on any rank. Returns True when it skipped."""
        if closure is not None:
            raise ValueError("GuardedAdamW.step takes no closure: compute the loss and call backward first")
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        skipped = any_nonfinite(grads, also=self._bad_loss if bad_loss is None else bad_loss, device=self._device())
        self.overflow = skipped
        self._skipped |= skipped
        if skipped:
            self.zero_grad(set_to_none=True)
            return True
        super().step()
        return False

    def engine_step(self, engine, *, bad_loss: bool) -> bool:
        """`engine.step()` at a gradient-accumulation boundary; True when the optimizer step was skipped:
        here (a non-finite gradient, or `bad_loss` on any rank) or by DeepSpeed before calling `step`
        (its ZeRO wrapper skips on a non-finite gradient norm and counts it in `skipped_steps`)."""
        skipped_before = engine.skipped_steps
        self._bad_loss, self._skipped = bad_loss, False
        try:
            engine.step()
        finally:
            self._bad_loss = False
        return self._skipped or engine.skipped_steps > skipped_before


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> GuardedAdamW:
    """Weight decay on matrices only; norms, biases and the SSMs' per-head scalars are not decayed.
    `foreach`: one multi-tensor kernel per AdamW operation instead of a loop over parameters."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return GuardedAdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=True)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1 over `warmup` steps, then cosine from 1 to `min_ratio` at step `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o.warmup_steps, cfg.train.steps, o.min_lr_ratio))


def build_deepspeed_ops() -> list[str]:
    """Build (or load, when already built) the C++ ops DeepSpeed compiles on first use, so no training
    process pays for it; returns their names. On CPU that is the shared-memory collective op
    (`ShareMemCommBuilder`, loaded by every `deepspeed.init_distributed`; building it took 3.5 minutes on
    two busy cores, loading it once built, 0.04 s; cached under $TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions). Accelerators without such an op build nothing.

    DeepSpeed logs to stdout; called first in a process (a study's driver, whose stdout is its JSON
    result), its logger is bound to stderr instead."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        built = []
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            builder.load(verbose=False)
            built.append(builder.NAME)
    return built
