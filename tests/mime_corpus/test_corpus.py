"""The MIME corpus: every case read right by libs.mime, and the same cases read by Python's plain
``email`` package, whose score is printed at the end of the run (the baseline to beat)."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.mime_corpus.conftest import REPORT
from tests.mime_corpus.corpus import CORPUS, Case, check, load_cases, read_ours, read_plain_email

CASES = load_cases()


def test_the_corpus_is_whole() -> None:
    files = sorted(p.name for p in CORPUS.glob("*.eml"))
    assert files == sorted(c.file for c in CASES)
    assert len(CASES) >= 50
    assert all(c.category and c.quirk and c.expect for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.file.removesuffix(".eml") for c in CASES])
def test_case(case: Case) -> None:
    assert check(case, read_ours(case.raw)) == []


def test_against_the_plain_email_package(request: pytest.FixtureRequest) -> None:
    ours: Counter[str] = Counter()
    plain: Counter[str] = Counter()
    total: Counter[str] = Counter()
    plain_wrong: list[str] = []
    for case in CASES:
        total[case.category] += 1
        ours[case.category] += not check(case, read_ours(case.raw))
        try:
            wrong = check(case, read_plain_email(case.raw))
        except Exception as exc:  # the plain package raising on a message gets all of it wrong
            wrong = [f"raised {type(exc).__name__}"]
        if wrong:
            plain_wrong.append(f"  {case.file}: {wrong[0][:150]}")
        else:
            plain[case.category] += 1
    n = len(CASES)
    lines = [f"ours {sum(ours.values())}/{n}, plain email {sum(plain.values())}/{n}"]
    lines += [
        f"  {category:<14} ours {ours[category]}/{count}, plain email {plain[category]}/{count}"
        for category, count in sorted(total.items())
    ]
    lines += ["cases the plain email package gets wrong:", *plain_wrong]
    request.config.stash[REPORT] = lines
    assert sum(ours.values()) == n
    assert sum(plain.values()) < n
