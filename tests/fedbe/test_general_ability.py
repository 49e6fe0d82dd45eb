"""General-ability probes: fixed, disjoint validation/test halves; scores that respond to the model."""

from __future__ import annotations

import math

import pytest
import torch

from fedbe import general_ability, sources
from fedbe.errors import DataError


def test_definition_questions_are_fixed_well_formed_and_split() -> None:
    test = general_ability.definition_questions(30, "test")
    assert test == general_ability.definition_questions(30, "test")  # the same every time
    assert test != general_ability.definition_questions(30, "test", seed=1)
    for q in test:
        assert len(q.options) == 4 and len(set(q.options)) == 4 and 0 <= q.answer < 4
    answers = {q.answer for q in test}
    assert len(answers) > 1  # the right option is not always in the same place
    validation = general_ability.definition_questions(30, "validation")
    assert not {q.word for q in test} & {q.word for q in validation}
    assert not set(general_ability.general_texts(20, "test")) & set(general_ability.general_texts(20, "validation"))
    with pytest.raises(DataError, match="split"):
        general_ability.definition_questions(3, "train")


def test_a_second_question_set_asks_none_of_the_first_sets_words() -> None:
    first = general_ability.definition_questions(400, "test", seed=2)
    more = general_ability.definition_questions(1600, "test", seed=2, exclude=first)
    assert len(more) == 1600 and len({q.word for q in more}) == 1600
    assert not {q.word for q in first} & {q.word for q in more}
    assert more == general_ability.definition_questions(1600, "test", seed=2, exclude=first)  # fixed too
    assert general_ability.definition_questions(400, "test", seed=2) == first  # the first set is unchanged by it
    for q in more:
        assert len(set(q.options)) == 4 and 0 <= q.answer < 4
    pool = len([w for w, _ in general_ability._wordnet_definitions() if general_ability._in_split(w, "test")])
    with pytest.raises(DataError, match="beyond the 400 already asked; ask for fewer"):
        general_ability.definition_questions(pool - 399, "test", seed=2, exclude=first)


def test_retention_is_after_over_before_and_before_over_after() -> None:
    r = general_ability.retention(
        {"definition_accuracy": 0.6, "perplexity": 40.0}, {"definition_accuracy": 0.3, "perplexity": 80.0}
    )
    assert r == {"definition_retention": 0.5, "perplexity_retention": 0.5}
    head = general_ability.retention(
        {"definition_accuracy": 0.6, "perplexity": 40.0, "perplexity_head": 30.0},
        {"definition_accuracy": 0.6, "perplexity": 50.0, "perplexity_head": 40.0},
    )
    assert head["perplexity_retention"] == 0.8 and head["perplexity_head_retention"] == 0.75


def test_scores_respond_to_the_model() -> None:
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    tokenizer = sources.load_tokenizer("tiny:llama")
    probe = general_ability.GeneralProbe.build(questions=8, texts=6, split="validation")
    before = probe.score(model, tokenizer)
    assert 0.0 <= before["definition_accuracy"] <= 1.0
    assert math.isfinite(before["perplexity"]) and before["perplexity"] > 1
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    after = probe.score(model, tokenizer)
    assert after["perplexity"] != pytest.approx(before["perplexity"], rel=1e-3)


def test_per_question_answers_agree_with_the_accuracy_and_count_changes() -> None:
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    tokenizer = sources.load_tokenizer("tiny:llama")
    probe = general_ability.GeneralProbe.build(questions=12, texts=3, split="validation")
    scores, answers = probe.score_with_answers(model, tokenizer)
    assert scores == probe.score(model, tokenizer)
    assert len(answers) == 12 and set(answers) <= {"0", "1"}
    assert answers.count("1") / 12 == pytest.approx(scores["definition_accuracy"])
    answered = general_ability.definition_answers(model, tokenizer, probe.questions)
    assert answers == general_ability.answer_string(answered)
    assert general_ability.answer_changes("1100", "1010") == (1, 1)
    assert general_ability.answer_changes("1111", "0001") == (3, 0)
    with pytest.raises(ValueError, match="same questions"):
        general_ability.answer_changes("110", "1100")
    with pytest.raises(ValueError, match="0/1"):
        general_ability.answer_changes("11x", "110")


def test_mcnemar_p_is_the_exact_two_sided_binomial_tail() -> None:
    assert general_ability.mcnemar_p(0, 0) == 1.0
    assert general_ability.mcnemar_p(3, 3) == 1.0
    assert general_ability.mcnemar_p(0, 5) == pytest.approx(2 / 32)  # just above 0.05: five of five is not enough
    assert general_ability.mcnemar_p(6, 0) == pytest.approx(2 / 64)
    assert general_ability.mcnemar_p(1, 9) == pytest.approx(2 * (1 + 10) / 1024)
    assert general_ability.mcnemar_p(9, 1) == general_ability.mcnemar_p(1, 9)
    with pytest.raises(ValueError, match=">= 0"):
        general_ability.mcnemar_p(-1, 2)


def test_a_probe_with_a_head_scores_its_first_texts_as_the_smaller_probe_does() -> None:
    """A 12-text probe with head 5 reports, from one pass, the perplexity of all 12 and the one a
    5-text probe of the same split gets; texts of different lengths make the two differ."""
    torch.manual_seed(0)
    model = sources.build_tiny_model("llama")
    tokenizer = sources.load_tokenizer("tiny:llama")
    wide = general_ability.GeneralProbe.build(questions=4, texts=12, split="validation", head=5).score(
        model, tokenizer
    )
    small = general_ability.GeneralProbe.build(questions=4, texts=5, split="validation").score(model, tokenizer)
    assert "perplexity_head" not in small
    assert wide["perplexity_head"] == pytest.approx(small["perplexity"], rel=1e-5)
    assert wide["perplexity"] != pytest.approx(small["perplexity"], rel=1e-3)
    texts = general_ability.general_texts(12, "validation")
    assert general_ability.perplexities(model, tokenizer, texts, (12, 5)) == pytest.approx(
        [general_ability.perplexity(model, tokenizer, texts), general_ability.perplexity(model, tokenizer, texts[:5])],
        rel=1e-5,
    )
    # a head no smaller than the probe is no head
    assert general_ability.GeneralProbe.build(questions=4, texts=5, split="validation", head=5).head == 0
    with pytest.raises(ValueError, match="every head must be in 1..12"):
        general_ability.perplexities(model, tokenizer, texts, (13,))
