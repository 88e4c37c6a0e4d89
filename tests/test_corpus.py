"""Offline corpora for calibration and training."""

from __future__ import annotations

from reamkit.calibration.corpus import code_documents, math_documents


def test_code_documents_are_real_python_in_a_fixed_order():
    docs = code_documents(300_000)
    assert docs == code_documents(300_000)
    assert sum(map(len, docs)) >= 300_000
    for d in docs:
        compile(d, "<stdlib>", "exec")                          # every document is valid Python


def test_math_documents_are_worked_distinct_and_correct():
    docs = math_documents(200, seed=3)
    assert docs == math_documents(200, seed=3)                 # deterministic
    assert len(set(docs)) == 200                               # distinct: no held-out item repeats in training
    assert all(d.startswith("Problem: ") and "\nSolution: " in d and "The answer is" in d for d in docs)
    solve = [d for d in docs if d.startswith("Problem: Solve for x")]
    assert len(solve) > 5
    for d in solve:                                            # the stated answer satisfies the equation
        eq = d.split("Solve for x: ")[1].split(".\n")[0]
        x = int(d.rsplit("x = ", 1)[1].rstrip("."))
        lhs, rhs = eq.split(" = ")
        b, a = lhs.split("x + ")
        assert int(b) * x + int(a) == int(rhs)
