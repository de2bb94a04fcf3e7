"""EleutherAI lm-evaluation-harness on a checkpoint: an `LM` subclass and `run_lm_eval`.

Contexts longer than the model's max_seq_len keep their most recent tokens (left truncation), the
usual choice for causal LMs. Every request is scored with BOS in front, as documents were in training.

Most registered lm-eval tasks download their data from the Hugging Face hub. Where the hub cannot be
reached (offline machines, HF_HUB_OFFLINE=1), `run_lm_eval` fails with one line saying so and how to run
a local task instead: a task YAML whose dataset is a local file, in a folder given as `include_path`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from pipeline.checkpoints import load_model


class AttambaEvalLM(LM):
    def __init__(self, model, tokenizer, device="cpu", max_gen_toks: int = 64):
        super().__init__()
        self.model, self.tok = model.eval(), tokenizer
        self._device = torch.device(device)
        self.max_len = model.config.max_seq_len
        self.max_gen_toks = max_gen_toks

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "AttambaEvalLM":
        model, cfg, tokenizer = load_model(path, device)
        if tokenizer is None:
            raise ValueError(f"{path} was trained on data.source={cfg.data.source}, whose tokens are not text; "
                             f"lm-eval tasks need a language model (score it with `attamba eval` without --lm-eval)")
        return cls(model, tokenizer, device)

    @torch.no_grad()
    def _continuation_logprob(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | BOS + context) and whether greedy decoding yields it exactly."""
        if not continuation:
            return 0.0, True
        seq = ([self.tok.bos_id] + context + continuation)[-(self.max_len + 1):]
        inp = torch.tensor([seq[:-1]], device=self._device)
        logprobs = F.log_softmax(self.model(inp)[0].float(), dim=-1)  # [T, V]
        n = len(continuation)
        target = torch.tensor(seq[-n:], device=self._device)
        picked = logprobs[-n:].gather(1, target[:, None])[:, 0]
        greedy = bool((logprobs[-n:].argmax(-1) == target).all())
        return float(picked.double().sum()), greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            # Encode the pair as one string where possible so the boundary tokenizes as in training.
            whole = self.tok.encode(context + continuation)
            ctx = self.tok.encode(context)
            if whole[:len(ctx)] == ctx:
                cont = whole[len(ctx):]
            else:
                cont = self.tok.encode(continuation)
            out.append(self._continuation_logprob(ctx, cont))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of max_seq_len targets, each window
        conditioned on the max_seq_len tokens before it."""
        out = []
        for req in requests:
            tokens = [self.tok.bos_id] + self.tok.encode(req.args[0])
            total = 0.0
            for start in range(1, len(tokens), self.max_len):
                stop = min(start + self.max_len, len(tokens))
                lo = max(0, stop - 1 - self.max_len)
                inp = torch.tensor([tokens[lo:stop - 1]], device=self._device)
                logprobs = F.log_softmax(self.model(inp)[0].float(), dim=-1)
                target = torch.tensor(tokens[start:stop], device=self._device)
                total += float(logprobs[-len(target):].gather(1, target[:, None]).double().sum())
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        """Greedy decoding through the parallel forward pass (no cache: adequate for small evals)."""
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = kwargs.get("max_gen_toks", self.max_gen_toks)
            tokens = [self.tok.bos_id] + self.tok.encode(context)
            new: list[int] = []
            text = ""
            for _ in range(limit):
                inp = torch.tensor([(tokens + new)[-self.max_len:]], device=self._device)
                nxt = int(self.model(inp)[0, -1].argmax())
                if nxt == self.tok.eos_id:
                    break
                new.append(nxt)
                text = self.tok.decode(new)
                if any(u in text for u in until):
                    break
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


# Exceptions (by class name, anywhere in the cause chain) that mean "the hub could not be reached":
# huggingface_hub's offline mode and missing local cache entries, requests' and httpx's connection errors.
HUB_UNREACHABLE = {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                   "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NameResolutionError"}
LOCAL_TASK_HINT = ("run a local task instead: write a task YAML whose dataset_path is a local loader (json, csv "
                   "or parquet) with dataset_kwargs.data_files pointing at your file, put it in a folder and pass "
                   "--include-path FOLDER with the YAML's task name (README: 'lm-eval tasks offline')")


def hub_unreachable(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the Hugging Face hub could not be reached."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ConnectionError) or type(error).__name__ in HUB_UNREACHABLE:
            return True
        error = error.__cause__ or error.__context__
    return False


def run_lm_eval(checkpoint, tasks: list[str], include_path=None, limit=None, device="cpu") -> dict:
    """lm-eval's results for `tasks` on a checkpoint: {"results": {task: {metric: value}}, ...}.

    ValueError in one line when a task needs the Hugging Face hub and the hub is unreachable."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = AttambaEvalLM.from_checkpoint(checkpoint, device)
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0)
    except Exception as error:
        if not hub_unreachable(error):
            raise
        detail = " ".join(str(error).split())[:200]
        raise ValueError(f"lm-eval task(s) {','.join(tasks)} need the Hugging Face hub for their data and the hub "
                         f"is unreachable ({type(error).__name__}: {detail}); {LOCAL_TASK_HINT}") from None
    if results is None:
        raise ValueError(f"lm-eval returned no results for tasks {tasks}")
    return {"results": results["results"], "versions": dict(results.get("versions", {}))}
