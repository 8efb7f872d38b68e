import json
import threading

import pytest

import tasks.models.answers as answers
from tasks.models.answers import check, last_boxed


def P(answer):
    return {"answer": answer, "metadata": "{}"}


@pytest.mark.parametrize(
    "completion, gold, extracted, correct",
    [
        # fractions
        ("so the result is \\boxed{\\frac{1}{2}}", "0.5", "\\frac{1}{2}", True),
        ("\\boxed{2/4}", "\\frac12", "2/4", True),
        ("\\boxed{\\frac{1}{3}}", "0.5", "\\frac{1}{3}", False),
        # decimals
        ("\\boxed{0.25}", "\\frac{1}{4}", "0.25", True),
        ("\\boxed{3.14}", "3.14159", "3.14", False),
        # sets (order does not matter, members do)
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", "\\{3, 1, 2\\}", True),
        ("\\boxed{\\{1,2\\}}", "\\{1,2,3\\}", "\\{1,2\\}", False),
        # intervals (open/closed ends matter)
        ("\\boxed{(0, 1]}", "(0,1]", "(0, 1]", True),
        ("\\boxed{[0,1]}", "(0,1]", "[0,1]", False),
        # algebra
        ("\\boxed{x^2+2x+1}", "(x+1)^2", "x^2+2x+1", True),
        # the last box wins; nested braces are kept
        ("first \\boxed{1}, finally \\boxed{\\frac{3}{4}}", "0.75", "\\frac{3}{4}", True),
        # no box: math-verify's fallback extraction
        ("The final answer is 1/2", "\\frac{1}{2}", "1/2", True),
        ("the result is 42", "42", "42", True),
        ("the result is 41", "42", "41", False),
        # nothing at all
        ("I do not know.", "3", None, False),
    ],
)
def test_math_verify_answers(completion, gold, extracted, correct):
    assert check(completion, P(gold)) == (extracted, correct)


def test_last_boxed_handles_unbalanced_and_fbox():
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None


def _rg_problem(task="chain_sum", seed=0):
    import reasoning_gym

    entry = reasoning_gym.create_dataset(task, size=1, seed=seed)[0]
    return entry, {"answer": entry["answer"], "question": entry["question"],
                   "metadata": json.dumps({"reasoning_gym": {"task": task, "entry": entry}})}


def test_reasoning_gym_partial_credit_is_not_correct():
    import reasoning_gym

    entry, problem = _rg_problem()
    gold = entry["answer"]
    partial = f"{gold} apples"
    scorer = reasoning_gym.get_score_answer_fn("chain_sum")
    assert 0 < scorer(answer=partial, entry=entry) < 1  # the generator gives partial credit here ...
    assert check(f"\\boxed{{{partial}}}", problem) == (partial, False)  # ... we do not
    assert check(f"\\boxed{{{gold}}}", problem) == (gold, True)
    assert check(f"\\boxed{{+{gold}.00}}" if not gold.startswith("-") else f"\\boxed{{{gold}.0}}", problem)[1] is True
    assert check("\\boxed{0}", problem)[1] is False


def test_off_the_main_thread_without_signals():
    out = []
    t = threading.Thread(target=lambda: out.append(check("\\boxed{\\frac{1}{2}}", P("0.5"))))
    t.start()
    t.join(30)
    assert out == [("\\frac{1}{2}", True)]


def test_off_main_thread_time_is_bounded(monkeypatch):
    """Off the main thread a check that overruns its timeout is answered 'not verified' while it still runs: the
    answer comes while the check is still held (an event, not a clock, says so)."""
    real = answers._check
    release = threading.Event()

    def slow(completion, problem, signal_ok, timeout):
        assert signal_ok is False  # no SIGALRM off the main thread
        release.wait(60)
        return real(completion, problem, signal_ok, timeout)

    monkeypatch.setattr(answers, "_check", slow)
    out = []
    t = threading.Thread(target=lambda: out.append(check("\\boxed{5}", P("5"), timeout_seconds=0.5)))
    t.start()
    t.join(30)  # (a check that waited for `slow` would still be waiting here: `slow` waits for the release below)
    release.set()
    assert out == [("5", False)]
