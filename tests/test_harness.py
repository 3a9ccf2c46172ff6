"""Zero-shot evaluation: our log-likelihoods are the program's own token log-probabilities, the lm-eval adapter
returns exactly those, and a task run through the harness gives the accuracy its answer key implies."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxslice import capture
from fxslice.evaluation.scoring import continuation_logprobs, rolling_logprob
from fxslice.testing import tiny_causal_lm


@pytest.fixture(scope="module")
def program():
    return capture(tiny_causal_lm("llama"))


@torch.no_grad()
def _direct(program, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    logprobs = program(ids[:, :-1]).double().log_softmax(-1)[0]
    n = len(continuation)
    return float(logprobs[-n:].gather(-1, ids[0, -n:, None]).sum())


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 99), min_size=1, max_size=12),
                          st.lists(st.integers(0, 99), min_size=1, max_size=4)), min_size=1, max_size=6),
       st.integers(1, 4))
def test_continuation_scores_are_the_programs_token_logprobs_whatever_the_batching(program, requests, batch_size):
    scores = continuation_logprobs(program, requests, max_length=64, batch_size=batch_size)
    for (context, continuation), (score, _) in zip(requests, scores, strict=True):
        assert score == pytest.approx(_direct(program, context, continuation), abs=1e-4)


def test_greedy_is_true_exactly_for_the_argmax_continuation(program):
    context = [5, 9, 17, 3]
    greedy = []
    for _ in range(3):
        greedy.append(int(program(torch.tensor([context + greedy]))[0, -1].argmax()))
    other = [(greedy[0] + 1) % 100, *greedy[1:]]
    (_, is_greedy), (_, not_greedy) = continuation_logprobs(program, [(context, greedy), (context, other)], max_length=64)
    assert is_greedy and not not_greedy


def test_a_long_context_is_cut_from_the_left(program):
    context, continuation = list(range(40)), [7, 8]
    (score, _), = continuation_logprobs(program, [(context, continuation)], max_length=10)
    assert score == pytest.approx(_direct(program, context[-(11 - 2):], continuation), abs=1e-4)


@pytest.mark.parametrize("max_length", [4, 7, 64])
def test_rolling_scores_each_token_once_with_the_context_it_is_given(program, max_length):
    ids, prefix = [int(t) for t in torch.randint(0, 100, (19,), generator=torch.Generator().manual_seed(1))], 0
    tokens = [prefix, *ids]
    expected = 0.0
    for start in range(0, len(ids), max_length):
        end = min(start + max_length, len(ids))
        first = max(0, end - max_length)
        for j in range(start + 1, end + 1):  # token j sees tokens[first:j]
            logits = program(torch.tensor([tokens[first:j]]))[0, -1].double()
            expected += float(logits.log_softmax(-1)[tokens[j]])
    assert rolling_logprob(program, ids, max_length=max_length, prefix=prefix) == pytest.approx(expected, abs=1e-4)


# --- through lm-eval ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """A tiny Llama trained on counting sequences, reading characters: 'defg' continues with 'h'."""
    pytest.importorskip("lm_eval")
    from fxslice.testing import char_tokenizer, trained_tiny_causal_lm

    program = capture(trained_tiny_causal_lm("llama"))
    program.tokenizer = char_tokenizer()
    return program


def test_the_adapters_loglikelihoods_are_the_programs_own(counting):
    from lm_eval.api.instance import Instance

    from fxslice.evaluation.harness import FxsliceLM

    lm = FxsliceLM(counting, batch_size=3)
    pairs = [("defgh", "ij"), ("abc", "d"), ("pqrs", "xyz"), ("klm", "n")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    tok = counting.tokenizer
    for (context, continuation), (score, _) in zip(pairs, lm.loglikelihood(requests, disable_tqdm=True), strict=True):
        ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tok(context, add_special_tokens=False)["input_ids"])
        assert score == pytest.approx(_direct(counting, ids[:n], ids[n:]), abs=1e-4)


def test_a_local_task_through_the_harness_scores_what_its_answer_key_implies(counting, tmp_path):
    from fxslice.evaluation.harness import evaluate_tasks

    alphabet = "abcdefghijklmnopqrstuvwxyz"
    gen = torch.Generator().manual_seed(0)
    docs = []
    for i in range(24):
        start = int(torch.randint(0, 14, (1,), generator=gen))
        context, answer = alphabet[start: start + 6], alphabet[start + 6]
        wrong = [c for c in "0123456789!?#" if c != answer][i % 10: i % 10 + 3]
        choices = [answer, *wrong]
        label = i % 4
        choices[0], choices[label] = choices[label], choices[0]
        docs.append({"context": context, "choices": choices, "label": label})
    data = tmp_path / "counting.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "counting.yaml").write_text(
        "task: counting_letters\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    table = evaluate_tasks(counting, ["counting_letters"], include=[tmp_path])
    tok = counting.tokenizer
    requests = [(tok(d["context"])["input_ids"], tok(c)["input_ids"]) for d in docs for c in d["choices"]]
    scores = continuation_logprobs(counting, requests, max_length=64)
    right = sum(max(range(4), key=lambda k, i=i: scores[4 * i + k][0]) == d["label"] for i, d in enumerate(docs))
    assert table["counting_letters"]["acc"] == pytest.approx(right / len(docs))
    assert table["counting_letters"]["acc"] > 0.9  # the model learned to count: the key is learnable


def test_unknown_tasks_are_named(counting):
    from fxslice import InvalidOption
    from fxslice.evaluation.harness import evaluate_tasks

    with pytest.raises(InvalidOption, match="no_such_task"):
        evaluate_tasks(counting, ["no_such_task"])


@pytest.mark.slow
def test_smollm2_reads_the_carried_cloze_task_far_above_chance(smollm2):
    pytest.importorskip("lm_eval")
    from fxslice.evaluation.harness import evaluate_tasks

    table = evaluate_tasks(smollm2[1], ["wikitext_cloze"], limit=40)
    assert table["wikitext_cloze"]["acc"] > 0.6  # chance is 0.25


def test_generation_through_the_adapter_is_fxslices_greedy_text_cut_at_the_stop_string(counting):
    from lm_eval.api.instance import Instance

    from fxslice.evaluation.generate import generate
    from fxslice.evaluation.harness import FxsliceLM

    lm = FxsliceLM(counting)
    request = Instance("generate_until", {}, ("abcdef", {"until": ["m"], "max_gen_toks": 10}), 0)
    (text,) = lm.generate_until([request], disable_tqdm=True)
    ids = counting.tokenizer("abcdef", add_special_tokens=False)["input_ids"]
    greedy = counting.tokenizer.decode(generate(counting, torch.tensor([ids]), max_new_tokens=10)[0, 6:].tolist())
    assert "m" in greedy and text == greedy.split("m")[0]  # the model counts on past the stop string
