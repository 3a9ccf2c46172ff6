"""Train some of a program's parameters (its adapters, or its linears' weights) on the next-token loss or by distillation
from a teacher program:
AdamW, linear warm-up then cosine decay, gradient clipping — the usual recipe for a short LoRA run — with a held-out
next-token loss before and after (the same measure for both objectives, so that they compare)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fxslice import InvalidOption, Program
from fxslice.core.graph import tensor_of
from fxslice.core.progress import StepProgress
from fxslice.passes.recovery.adapters import adapters

__all__ = ["TrainReport", "train_adapters", "train_parameters", "next_token_loss", "distillation_loss"]


@dataclass
class TrainReport:
    steps: int
    tokens: int
    held_out_before: float | None
    held_out_after: float | None
    losses: list[float] = field(default_factory=list)  # the training loss of every step
    seconds: float = 0.0
    objective: str = "lm"  # "lm": next-token cross entropy; "distill": KL divergence from the teacher


def next_token_loss(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a batch [n, length] (float32 even for a half-precision program)."""
    ids = ids.to(program.device)
    logits = program(ids)[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def distillation_loss(program: Program, teacher: Program, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher ‖ program) of the distributions softened by `temperature`, times its square (so
    that gradients keep their scale whatever the temperature). Every position counts, the last one too: the teacher
    gives a target for it where the text gives none."""
    ids = ids.to(program.device)
    with torch.no_grad():
        target = F.log_softmax(teacher(ids.to(teacher.device)).to(program.device).float() / temperature, dim=-1)
    log_probs = F.log_softmax(program(ids).float() / temperature, dim=-1)
    kl = F.kl_div(log_probs.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
    return kl * temperature**2


@torch.no_grad()
def _mean_loss(program: Program, windows: torch.Tensor, batch_size: int) -> float:
    losses = [float(next_token_loss(program, windows[i: i + batch_size])) * len(windows[i: i + batch_size])
              for i in range(0, len(windows), batch_size)]
    return sum(losses) / len(windows)


@contextmanager
def _only_these_train(program: Program, targets: list[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Every parameter frozen but `targets`', for the duration; the flags are put back afterwards."""
    trainable = {id(tensor_of(program.gm, name)) for name in targets}
    flags = {p: p.requires_grad for p in program.gm.parameters()}
    params = [p for p in program.gm.parameters() if id(p) in trainable]
    try:
        for p in flags:
            p.requires_grad_(id(p) in trainable)
        yield params
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def train_adapters(program: Program, windows: torch.Tensor, **options) -> TrainReport:
    """`train_parameters` on the program's adapters and nothing else."""
    found = adapters(program)
    if not found:
        raise InvalidOption("the program has no adapters to train: run InsertAdapters first")
    return train_parameters(program, [name for a in found for name in (a.a, a.b)], windows, **options)


def train_parameters(program: Program, targets: list[str], windows: torch.Tensor, *, steps: int, lr: float,
                     batch_size: int = 1, held_out: torch.Tensor | None = None, warmup: float = 0.05,
                     clip: float = 1.0, progress: bool = False, teacher: Program | None = None,
                     temperature: float = 1.0) -> TrainReport:
    """`steps` optimizer steps on the parameters `targets` (every other one frozen) over `windows` [n, length] in
    order, wrapping around; `held_out` windows (never trained on) are scored before and after. With a `teacher`,
    the parameters learn its distributions (`distillation_loss`) instead of the text's next tokens."""
    if windows.dim() != 2 or len(windows) == 0:
        raise InvalidOption("training windows must be a non-empty [n, length] tensor of token ids")
    if steps < 1 or lr <= 0 or batch_size < 1:
        raise InvalidOption(f"recovery: steps and batch size must be positive and lr > 0 (got {steps}, "
                            f"{batch_size}, {lr})")
    start = time.perf_counter()
    before = _mean_loss(program, held_out, batch_size) if held_out is not None and len(held_out) else None
    if teacher is not None and teacher.vocab_size != program.vocab_size:
        raise InvalidOption(f"distillation: the teacher scores {teacher.vocab_size} tokens, the model "
                            f"{program.vocab_size}; the teacher must share the model's vocabulary")
    if not temperature > 0:
        raise InvalidOption(f"distillation: temperature must be positive, got {temperature!r}")
    report = TrainReport(steps, steps * batch_size * windows.shape[1], before, None,
                         objective="lm" if teacher is None else "distill")
    warm = max(1, round(warmup * steps))

    def rate(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    with _only_these_train(program, targets) as params, torch.enable_grad():
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        with StepProgress(steps, "recovery fine-tuning", enabled=progress) as bar:
            for step in range(steps):
                rows = torch.arange(step * batch_size, (step + 1) * batch_size) % len(windows)
                loss = (next_token_loss(program, windows[rows]) if teacher is None
                        else distillation_loss(program, teacher, windows[rows], temperature))
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"recovery: the training loss is {float(loss.detach())} at step {step}; "
                                             "lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                schedule.step()
                value = float(loss.detach())
                report.losses.append(round(value, 5))
                bar.advance(f"loss {value:.3f}")
    if held_out is not None and len(held_out):
        report.held_out_after = _mean_loss(program, held_out, batch_size)
    report.seconds = time.perf_counter() - start
    return report
