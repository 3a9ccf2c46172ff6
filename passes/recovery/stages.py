"""Recovery fine-tuning as a recipe stage: the last step of slice → prune → recover."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fxslice import InvalidOption, Program
from fxslice.passes.facts import CAPTURED, QUANTIZED, RECOVERED
from fxslice.passes.recovery.recover import RecoverFull, RecoverLoRA
from fxslice.recipes import Stage, StageContext, StageResult

__all__ = ["Recover", "METHODS", "OBJECTIVES"]

#: what recovery trains on: the text's next tokens, or the distributions of the program before compression
OBJECTIVES = ("lm", "distill")
#: what recovery trains: low-rank adapters merged afterwards, or the weights themselves
METHODS = ("lora", "full")


@dataclass(frozen=True, kw_only=True)
class Recover(Stage):
    """Train low-rank adapters on `text` for `steps` steps of `batch_size` windows of `length` tokens, then merge
    them (`method="lora"`; `rank` and `alpha` are theirs), or train the same weights in place (`method="full"`):
    the model keeps its size and structure either way. `text` is a `fxslice.data.load_text` source (never the
    evaluation split; "" trains on the recipe's calibration windows); `held_out` of its windows are kept
    aside and scored before and after. `objective`: "lm" learns the text's next tokens; "distill" learns the
    output distributions (at `temperature`) of the program as the recipe received it, before compression."""

    kind = "recover"
    needs = frozenset({CAPTURED})
    refuses = frozenset({QUANTIZED})
    provides = frozenset({RECOVERED})

    rank: int = 8
    alpha: float = 16.0
    steps: int = 100
    lr: float = 5e-4
    batch_size: int = 2
    length: int | None = None  # None: 512 tokens, or the model's context if shorter
    text: str = "wikitext2:validation"
    held_out: int = 8
    head: bool = False
    seed: int = 0
    objective: str = "lm"
    temperature: float = 1.0
    method: str = "lora"

    def __post_init__(self) -> None:
        self.require_positive_ints("rank", "steps", "batch_size", *(("length",) if self.length is not None else ()))
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, int) or self.held_out < 0:
            raise InvalidOption(f"recover: held_out must be a non-negative integer, got {self.held_out!r}")
        if self.method not in METHODS:
            raise InvalidOption(f"recover: method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            raise InvalidOption(f"recover: objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        for name in ("lr", "alpha", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidOption(f"recover: {name} must be positive, got {value!r}")
        if self.text in ("wikitext2:test",):
            raise InvalidOption("recover: training on the test split would make every test figure meaningless; "
                                "use wikitext2:validation or your own text")

    @property
    def learns_from_teacher(self) -> bool:  # type: ignore[override]
        return self.objective == "distill"

    @property
    def calibrates(self) -> bool:  # type: ignore[override]
        """Only without a text of its own does it need the recipe's calibration windows."""
        return not self.text

    def summary(self, result: StageResult) -> list[str]:
        report = result.report
        if report.get("held_out_before") is None:
            return []
        how = " distilled from the model before compression" if report.get("objective") == "distill" else ""
        return [f"recovery     {report['steps']} steps, {report['tokens']:,} tokens{how}: held-out loss "
                f"{report['held_out_before']:.4f} -> {report['held_out_after']:.4f}"]

    def windows(self, program: Program, context: StageContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(training windows, held-out windows), shuffled with the seed."""
        if not self.text:
            windows = context.windows(self.kind)
        else:
            from fxslice.data import load_text, token_windows

            if program.tokenizer is None:
                raise InvalidOption("recover: the model has no tokenizer to read the training text with")
            limit = (program.config or {}).get("max_position_embeddings")
            length = self.length or min(512, limit or 512)
            windows = token_windows(program.tokenizer, load_text(self.text), length, max_length=limit)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(self.seed))
        held = min(self.held_out, len(windows) - 1)
        return windows[order[held:]], windows[order[:held]]

    def run(self, program: Program, context: StageContext) -> StageResult:
        teacher = context.teacher_for(self.kind) if self.learns_from_teacher else None
        if teacher is not None and teacher.digest() == program.digest():
            raise InvalidOption("recover: distillation has nothing to learn, the model is its teacher unchanged; put "
                                "the stage after a compression stage, or give Recipe.run the dense program as teacher")
        train, held_out = self.windows(program, context)
        common = dict(steps=self.steps, lr=self.lr, batch_size=self.batch_size, held_out=held_out, head=self.head,
                      progress=context.progress, teacher=teacher, temperature=self.temperature)
        recover: RecoverLoRA | RecoverFull = (
            RecoverFull(train, **common) if self.method == "full"
            else RecoverLoRA(train, rank=self.rank, alpha=self.alpha, seed=self.seed, **common))
        result = self.run_passes(program, [recover], context)
        report = asdict(recover.report) if recover.report is not None else {}
        report["training_windows"], report["held_out_windows"] = len(train), len(held_out)
        result.report = report
        return result
