"""EleutherAI's lm-evaluation-harness on a Program: `fxslice eval DIR --tasks piqa,arc_easy,...`.

`FxsliceLM` is the harness's model interface over a Program (log-likelihoods from `fxslice.evaluation.scoring`,
greedy generation from `fxslice.evaluation.generate`), so the harness's own task definitions, prompts and
metrics give the numbers papers report. Online, task names download their datasets; offline, `include` names
directories of task YAML files (the harness's format), and `wikitext_cloze` is a task this package carries.
lm-eval is an optional dependency: `pip install 'fxslice[eval]'`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fxslice.core.errors import InvalidOption
from fxslice.core.program import Program
from fxslice.evaluation.generate import generate
from fxslice.evaluation.scoring import continuation_logprobs, rolling_logprob

__all__ = ["FxsliceLM", "evaluate_tasks", "make_lm", "require_lm_eval", "BUILTIN_TASKS"]

#: tasks this package carries (their YAML and data), found without a download
BUILTIN_TASKS = Path(__file__).parent / "tasks"


def require_lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.api.model
    except ImportError as exc:
        raise InvalidOption("zero-shot tasks need lm-eval: pip install 'fxslice[eval]' (or pip install lm-eval)") from exc
    return lm_eval


def _max_length(program: Program, max_length: int | None) -> int:
    context = (program.config or {}).get("max_position_embeddings")
    return int(max_length or min(context or 2048, 2048))


def make_lm(program: Program, *, batch_size: int = 8, max_length: int | None = None) -> Any:
    """An lm-eval `TemplateLM` over `program` (built on first use, so that lm-eval stays optional)."""
    lm_eval = require_lm_eval()
    if program.tokenizer is None:
        raise InvalidOption("zero-shot tasks read text: the model needs a tokenizer")

    class FxsliceLM(lm_eval.api.model.TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.program, self.tokenizer = program, program.tokenizer
            self.batch_size, self.max_length = batch_size, _max_length(program, max_length)

        @property
        def eot_token_id(self) -> int:
            eos = self.tokenizer.eos_token_id
            return int(eos if eos is not None else 0)

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

        def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
            return self.tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            pairs = [(context, continuation) for _, context, continuation in requests]
            return continuation_logprobs(self.program, pairs, max_length=self.max_length,
                                         batch_size=self.batch_size, progress=not disable_tqdm)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            return [rolling_logprob(self.program, self.tok_encode(r.args[0]), max_length=self.max_length,
                                    prefix=self.prefix_token_id) for r in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            answers = []
            for request in requests:
                context, options = request.args
                until = options.get("until") or [self.tokenizer.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                budget = min(int(options.get("max_gen_toks", 256)), self.max_length // 2)
                ids = self.tok_encode(context)[-(self.max_length - budget):]
                out = generate(self.program, torch.tensor([ids]), max_new_tokens=budget,
                               eos_token_id=self.eot_token_id)
                text = self.tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
                cut = min([text.find(u) for u in until if u and u in text] or [len(text)])
                answers.append(text[:cut])
            return answers

    FxsliceLM.__name__ = FxsliceLM.__qualname__ = "FxsliceLM"
    return FxsliceLM()


FxsliceLM = make_lm  # the adapter's public name: call it with a Program


def evaluate_tasks(program: Program, tasks: list[str], *, include: list[str | Path] = (), limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval's `tasks` on `program`; per task, its metrics (e.g. `acc`, `acc_norm`, with `_stderr`)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(BUILTIN_TASKS), *(str(p) for p in include)]
    manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise InvalidOption(f"unknown task(s) {', '.join(unknown)}: give lm-eval task names (e.g. piqa, arc_easy, "
                            "hellaswag, winogrande, arc_challenge), `wikitext_cloze`, or --include a directory of "
                            "task YAML files")
    results = lm_eval.simple_evaluate(model=make_lm(program, batch_size=batch_size), tasks=tasks, task_manager=manager,
                                      limit=limit, num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False)
    return {task: {key.split(",")[0]: float(value) for key, value in metrics.items()  # "acc,none" -> "acc"
                   if "," in key and isinstance(value, (int, float))}
            for task, metrics in results["results"].items()}
