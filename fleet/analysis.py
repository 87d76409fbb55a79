"""Canary analysis by metrics, in the spirit of Argo Rollouts' AnalysisRun.

After the canary wave is deployed and committed, each declared analysis asks Prometheus
its query ``count`` times, ``interval`` seconds apart, all analyses at once. Every sample
of a measurement must satisfy the analysis's condition (``result >= 0.99``): then the
measurement is successful; any sample that does not makes it failed; an empty answer, a
NaN or a query that could not be asked makes it inconclusive, since it says nothing about
the canary. An analysis fails as soon as its failures exceed ``failure_limit``; else it is
inconclusive when its inconclusive measurements exceed ``inconclusive_limit``; else it
succeeds.

The condition is a tiny grammar of our own, never ``eval``: ``result OP NUMBER`` with OP
one of ``< <= > >= == !=``, joined by ``and`` and ``or`` (``and`` binds tighter), so that
a declaration cannot run code on the operator's machine.

This module knows neither ssh nor the command line: the rollout hands it a function that
asks Prometheus.
"""

from __future__ import annotations

import math
import operator
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from fleet import interrupt
from fleet.errors import printable


class ConditionError(ValueError):
    """A successCondition outside the grammar."""


_COMPARE: Mapping[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_TOKEN = re.compile(
    r"\s*(?:(?P<op><=|>=|==|!=|<|>)|(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<word>[A-Za-z]+))"
)
MAX_CONDITION = 200  # characters: a condition is a line, not a program


@dataclass(frozen=True)
class Comparison:
    op: str
    number: float

    def holds(self, value: float) -> bool:
        return _COMPARE[self.op](value, self.number)


@dataclass(frozen=True)
class Condition:
    """``any`` of ``all`` of comparisons: the ``or`` of ``and`` groups, as written."""

    text: str
    groups: tuple[tuple[Comparison, ...], ...]

    def holds(self, value: float) -> bool:
        return any(all(c.holds(value) for c in group) for group in self.groups)


def _tokens(text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ConditionError(f"unexpected {text[position:].strip()[:20]!r}")
        kind = match.lastgroup
        assert kind is not None
        found.append((kind, match.group(kind)))
        position = match.end()
    return found


def parse_condition(text: str) -> Condition:
    """``result OP NUMBER`` joined by ``and`` / ``or``; anything else is refused."""
    if len(text) > MAX_CONDITION:
        raise ConditionError(f"longer than {MAX_CONDITION} characters")
    tokens = _tokens(text)
    if not tokens:
        raise ConditionError("empty: expected e.g. 'result >= 0.99'")
    groups: list[tuple[Comparison, ...]] = []
    group: list[Comparison] = []
    index = 0
    while True:
        part = tokens[index : index + 3]
        if len(part) < 3 or part[0] != ("word", "result") or part[1][0] != "op":
            raise ConditionError("expected 'result OP NUMBER', OP one of < <= > >= == !=")
        if part[2][0] != "number":
            raise ConditionError(f"expected a number after {part[1][1]!r}, not {part[2][1]!r}")
        number = float(part[2][1])
        if not math.isfinite(number):
            raise ConditionError(f"{part[2][1]!r} is not a finite number")
        group.append(Comparison(part[1][1], number))
        index += 3
        if index == len(tokens):
            groups.append(tuple(group))
            return Condition(text, tuple(groups))
        joint = tokens[index]
        if joint == ("word", "or"):
            groups.append(tuple(group))
            group = []
        elif joint != ("word", "and"):
            raise ConditionError(f"expected 'and' or 'or', not {joint[1]!r}")
        index += 1


@dataclass(frozen=True)
class Analysis:
    """One declared analysis, as the inventory carries it (templates already rendered)."""

    name: str
    query: str  # PromQL with {{hosts}}, {{baseline}} and {{service}}
    condition: Condition
    interval: float
    count: int
    failure_limit: int = 0
    inconclusive_limit: int = 0
    service: str | None = None  # what {{service}} stands for


def alternation(hosts: Sequence[str]) -> str:
    """Host names as a regular expression for Prometheus' ``=~``, which anchors it; the
    only metacharacter a name may hold, '.', escaped as a PromQL string wants it."""
    return "|".join(h.replace(".", "\\\\.") for h in sorted(hosts))


def fill(query: str, hosts: Sequence[str], baseline: Sequence[str], service: str | None) -> str:
    """The query as sent: its placeholders replaced."""
    return (
        query.replace("{{hosts}}", alternation(hosts))
        .replace("{{baseline}}", alternation(baseline))
        .replace("{{service}}", service or "")
    )


class Outcome(StrEnum):
    SUCCESSFUL = "successful"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Measurement:
    time: str  # when it was taken, UTC
    values: tuple[float, ...]  # the instant vector's samples
    outcome: Outcome
    message: str | None = None  # why it is not successful

    def as_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            # JSON has no NaN: those are written as strings, as Prometheus writes them.
            "values": [v if math.isfinite(v) else str(v) for v in self.values],
            "outcome": self.outcome.value,
            "message": self.message,
        }


def judge(
    answer: Mapping[str, Any], condition: Condition
) -> tuple[tuple[float, ...], Outcome, str | None]:
    """One Prometheus answer (``status``, ``data``) against the condition. The answer
    comes through a monitoring host: any shape is a verdict (inconclusive), never an
    error, and what it says is cut and made printable."""
    if answer.get("status") != "success":
        error = printable(str(answer.get("error", "no success")))
        return (), Outcome.INCONCLUSIVE, f"Prometheus: {error}"
    data = answer.get("data")
    data = data if isinstance(data, dict) else {}
    kind, result = data.get("resultType"), data.get("result")
    pairs: list[Any]
    if kind == "scalar" and isinstance(result, list):
        pairs = [result]
    elif kind == "vector" and isinstance(result, list):
        pairs = [s.get("value") if isinstance(s, dict) else None for s in result]
    else:
        return (
            (),
            Outcome.INCONCLUSIVE,
            f"expected an instant vector, not {printable(repr(kind), 40)}",
        )
    # Prometheus writes each sample as [time, "value"]: the value a string, always.
    samples = [p[1] for p in pairs if isinstance(p, list) and len(p) == 2]
    try:
        if len(samples) != len(pairs) or not all(isinstance(v, str) for v in samples):
            raise ValueError
        values = tuple(float(v) for v in samples)
    except ValueError:
        return (), Outcome.INCONCLUSIVE, "a sample's value is not a number"
    if not values:
        return values, Outcome.INCONCLUSIVE, "no data: the query matched no series"
    if any(math.isnan(v) for v in values):
        return values, Outcome.INCONCLUSIVE, "NaN: no data in the window"
    failing = [v for v in values if not condition.holds(v)]
    if failing:
        return values, Outcome.FAILED, f"{failing[0]:g} does not satisfy {condition.text!r}"
    return values, Outcome.SUCCESSFUL, None


Query = Callable[[str], Mapping[str, Any]]  # PromQL -> Prometheus' answer; raises if it cannot


@dataclass
class Run:
    """One analysis's run: what was asked, what came back, and the verdict."""

    analysis: Analysis
    query: str  # as sent
    measurements: list[Measurement] = field(default_factory=list)
    result: Outcome | None = None
    message: str | None = None

    def count(self, outcome: Outcome) -> int:
        return sum(m.outcome is outcome for m in self.measurements)

    def decide(self, complete: bool) -> Outcome | None:
        """Argo's order: failed once failures pass the limit; at the end, inconclusive
        when inconclusives pass theirs; else successful. None: not decided yet."""
        a = self.analysis
        if self.count(Outcome.FAILED) > a.failure_limit:
            last = [m for m in self.measurements if m.outcome is Outcome.FAILED][-1]
            self.result, self.message = Outcome.FAILED, last.message
        elif not complete:
            return None
        elif self.count(Outcome.INCONCLUSIVE) > a.inconclusive_limit:
            last = [m for m in self.measurements if m.outcome is Outcome.INCONCLUSIVE][-1]
            self.result, self.message = Outcome.INCONCLUSIVE, last.message
        else:
            self.result, self.message = Outcome.SUCCESSFUL, None
        return self.result

    def why(self) -> str:
        n = len(self.measurements)
        return (
            f"{self.count(Outcome.FAILED)} failed, {self.count(Outcome.INCONCLUSIVE)} "
            f"inconclusive of {n} measurement{'s' if n != 1 else ''}"
            + (f" (last: {self.message})" if self.message else "")
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.analysis.name,
            "query": self.query,
            "successCondition": self.analysis.condition.text,
            "measurements": [m.as_json() for m in self.measurements],
            "result": self.result.value if self.result else None,
            "message": self.message,
        }


def measure(run: Run, query: Query, now: Callable[[], datetime]) -> Measurement:
    taken = now().isoformat(timespec="milliseconds")
    try:
        answer = query(run.query)
    except Exception as exc:  # the query could not be asked: it says nothing of the canary
        return Measurement(taken, (), Outcome.INCONCLUSIVE, f"query failed: {exc}")
    values, outcome, message = judge(answer, run.analysis.condition)
    return Measurement(taken, values, outcome, message)


def verdict(runs: Sequence[Run]) -> Outcome:
    """The rollout's: any failed analysis fails it, else any inconclusive one stops it."""
    results = {r.result for r in runs}
    if Outcome.FAILED in results:
        return Outcome.FAILED
    if Outcome.INCONCLUSIVE in results or None in results:
        return Outcome.INCONCLUSIVE
    return Outcome.SUCCESSFUL


def run_all(
    analyses: Sequence[Analysis],
    hosts: Sequence[str],
    baseline: Sequence[str],
    query: Query,
    on_measurement: Callable[[Run, Measurement], None] = lambda _r, _m: None,
    wait: Callable[[threading.Event, float], bool] = lambda e, s: e.wait(s),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> list[Run]:
    """Every analysis at once, each measurement one interval after the last (the first
    one interval after the start, so that the canaries have served the window's
    traffic). One failed analysis decides the rollout: the others stop, and an analysis
    cut short is inconclusive."""
    runs = [Run(a, fill(a.query, hosts, baseline, a.service)) for a in analyses]
    failed = threading.Event()

    def one(run: Run) -> None:
        for _ in range(run.analysis.count):
            if wait(failed, run.analysis.interval):
                break
            measurement = measure(run, query, now)
            run.measurements.append(measurement)
            on_measurement(run, measurement)
            if run.decide(complete=False) is Outcome.FAILED:
                failed.set()
                return
        if len(run.measurements) < run.analysis.count:
            run.result = Outcome.INCONCLUSIVE
            run.message = "cut short: another analysis failed"
            return
        run.decide(complete=True)

    with ThreadPoolExecutor(max_workers=max(1, len(runs))) as pool:
        interrupt.gather(pool, one, runs)
    return runs
