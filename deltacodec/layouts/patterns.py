"""``rank_pattern`` / ``alpha_pattern`` keys, matched the way PEFT matches them, in bounded time.

PEFT (``peft.utils.other.get_pattern_key``) takes, for a module named ``name`` (its name inside
the base model), the first key of the pattern map for which
``re.match(rf"(.*\\.)?({key})$", name)`` succeeds; when none does, it looks ``name`` itself up in
the map. A key is a regular expression, and Python's backtracking matcher takes exponential time
on keys such as ``(a+)+b`` (tens of seconds against one ordinary module name).

Here the same composed expression is parsed by Python's own regex parser (so its syntax, flags
and character classes are exactly PEFT's) and run on a Thompson NFA: at most
``(len(name) + 1) x states`` state visits, never backtracking. The constructs that are not
regular, or whose meaning depends on the backtracking order, are refused with the key named:
backreferences, lookaround, conditionals, atomic groups and possessive repeats. Counted repeats
are expanded, so a key may expand to at most :data:`MAX_STATES` NFA states.

Character tests (literals, classes, ``.``, ``\\d``, case folding) are delegated to Python's
``re`` one character at a time, so they mean exactly what they mean to PEFT.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, TypeVar

try:  # Python >= 3.11
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre  # type: ignore[no-redef]

__all__ = ["PatternError", "KeyMatcher", "compile_key", "pattern_key", "MAX_STATES", "MAX_KEY_CHARS"]

MAX_STATES = 20_000
MAX_KEY_CHARS = 4096
MAX_NESTING = 100
_PREFIX_LEN = len(r"(.*\.)?(")  # what PEFT puts before the key; error positions are the key's

_CATEGORY_SOURCE = {
    _sre.CATEGORY_DIGIT: r"\d",
    _sre.CATEGORY_NOT_DIGIT: r"\D",
    _sre.CATEGORY_SPACE: r"\s",
    _sre.CATEGORY_NOT_SPACE: r"\S",
    _sre.CATEGORY_WORD: r"\w",
    _sre.CATEGORY_NOT_WORD: r"\W",
}
_NOT_REGULAR = {
    _sre.GROUPREF: "a backreference",
    _sre.GROUPREF_EXISTS: "a conditional group",
    _sre.ASSERT: "a lookahead/lookbehind",
    _sre.ASSERT_NOT: "a negative lookahead/lookbehind",
}
for _name, _why in (("ATOMIC_GROUP", "an atomic group"), ("POSSESSIVE_REPEAT", "a possessive repeat")):
    if hasattr(_sre, _name):  # Python >= 3.11
        _NOT_REGULAR[getattr(_sre, _name)] = _why


class PatternError(ValueError):
    """A pattern key PEFT could not use, or one this matcher refuses; the message says why."""


def _char(c: int) -> str:
    # \U escapes are valid inside and outside classes and never change meaning.
    return "\\U%08x" % c


def _atom_source(op: object, av: object) -> str:
    """Regex source of one character-consuming atom of a parsed pattern."""
    if op is _sre.LITERAL:
        return _char(av)  # type: ignore[arg-type]
    if op is _sre.NOT_LITERAL:
        return "[^" + _char(av) + "]"  # type: ignore[arg-type]
    if op is _sre.ANY:
        return "."
    parts = []
    negate = ""
    for iop, iav in av:  # type: ignore[union-attr]
        if iop is _sre.NEGATE:
            negate = "^"
        elif iop is _sre.LITERAL:
            parts.append(_char(iav))
        elif iop is _sre.RANGE:
            parts.append(_char(iav[0]) + "-" + _char(iav[1]))
        elif iop is _sre.CATEGORY and iav in _CATEGORY_SOURCE:
            parts.append(_CATEGORY_SOURCE[iav])
        else:
            raise PatternError(f"unsupported character class item {iop}")
    return "[" + negate + "".join(parts) + "]"


def _flag_prefix(flags: int) -> str:
    letters = ("i" if flags & re.IGNORECASE else "") + ("s" if flags & re.DOTALL else "") + ("a" if flags & re.ASCII else "")
    return f"(?{letters})" if letters else ""


@dataclass
class _State:
    kind: str  # "char", "split", "assert", "accept"
    test: Callable[[str], bool] | None = None
    outs: list[int] = field(default_factory=list)
    at: object = None  # the AT code of an assertion
    flags: int = 0


class KeyMatcher:
    """One pattern key, compiled to an NFA for ``re.match(rf"(.*\\.)?({key})$", name)``.

    ``steps`` counts state visits over the matcher's lifetime: the work done, which is at most
    ``(len(name) + 1) * len(states)`` per call (plus the branch fan-out of split states).
    """

    def __init__(self, key: str) -> None:
        if not isinstance(key, str):
            raise PatternError(f"a pattern key must be a string, got {type(key).__name__}")
        if len(key) > MAX_KEY_CHARS:
            raise PatternError(f"a pattern key is limited to {MAX_KEY_CHARS} characters, this one has {len(key)}")
        self.key = key
        self.steps = 0
        self._states: list[_State] = []
        self._atoms: dict[str, Callable[[str], bool]] = {}
        try:
            parsed = _sre.parse(rf"(.*\.)?({key})$", 0)
        except re.error as exc:
            at = "" if exc.pos is None or not 0 <= exc.pos - _PREFIX_LEN <= len(key) else f" at position {exc.pos - _PREFIX_LEN}"
            raise PatternError(f"not a valid regular expression: {exc.msg}{at}") from None
        except (RecursionError, OverflowError, ValueError, AssertionError) as exc:
            raise PatternError(f"cannot be parsed as a regular expression: {type(exc).__name__}") from None
        flags = parsed.state.flags
        needed = self._size(parsed.data, 0)
        if needed > MAX_STATES:
            raise PatternError(f"expands to more than {MAX_STATES} matcher states (counted repeats too large)")
        self._accept = self._new(_State("accept"))
        self.start = self._build(parsed.data, self._accept, flags)
        self._word = re.compile(r"\w", flags & re.ASCII)
        self._fixed = self._fixed_key(parsed)
        # A lazily built DFA (sets of NFA states, memoised per character) serves every name
        # without a newline, as long as no assertion depends on more than "at the end or not":
        # word boundaries and multi-line anchors look at neighbouring characters.
        self._cacheable = all(
            st.kind != "assert" or (st.at not in (_sre.AT_BOUNDARY, _sre.AT_NON_BOUNDARY) and not st.flags & re.MULTILINE)
            for st in self._states
        )
        self._dfa: dict[tuple[frozenset[int], str, bool], frozenset[int]] = {}

    @property
    def nstates(self) -> int:
        return len(self._states)

    # -- construction ----------------------------------------------------------------------

    def _size(self, items: Iterable[tuple[object, object]], depth: int) -> int:
        """Upper bound on the states ``_build`` creates; refuses what is not regular."""
        if depth > MAX_NESTING:
            raise PatternError(f"nested more than {MAX_NESTING} levels deep")
        total = 0
        for op, av in items:
            if op in _NOT_REGULAR:
                raise PatternError(f"uses {_NOT_REGULAR[op]}, which has no bounded-time (non-backtracking) match")
            if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.AT):
                total += 1
            elif op is _sre.BRANCH:
                total += 1 + sum(self._size(alt, depth + 1) for alt in av[1])  # type: ignore[index]
            elif op is _sre.SUBPATTERN:
                total += self._size(av[3], depth + 1)  # type: ignore[index]
            elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
                lo, hi, body = av  # type: ignore[misc]
                copies = lo + 1 if hi is _sre.MAXREPEAT else hi
                total += copies * (self._size(body, depth + 1) + 1)
            else:
                raise PatternError(f"uses the regex construct {op}, which this matcher does not support")
            if total > MAX_STATES:
                return total
        return total

    def _new(self, state: _State) -> int:
        self._states.append(state)
        return len(self._states) - 1

    def _atom(self, op: object, av: object, flags: int) -> Callable[[str], bool]:
        source = _flag_prefix(flags) + _atom_source(op, av)
        test = self._atoms.get(source)
        if test is None:
            pat = re.compile(source)
            memo: dict[str, bool] = {}

            def test(ch: str, pat: re.Pattern[str] = pat, memo: dict[str, bool] = memo) -> bool:
                hit = memo.get(ch)
                if hit is None:
                    hit = memo[ch] = pat.fullmatch(ch) is not None
                return hit

            self._atoms[source] = test
        return test

    def _build(self, items: list[tuple[object, object]], nxt: int, flags: int) -> int:
        """States for ``items`` followed by state ``nxt``; returns the entry state."""
        for op, av in reversed(list(items)):
            nxt = self._build_one(op, av, nxt, flags)
        return nxt

    def _build_one(self, op: object, av: object, nxt: int, flags: int) -> int:
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN):
            return self._new(_State("char", test=self._atom(op, av, flags), outs=[nxt]))
        if op is _sre.AT:
            return self._new(_State("assert", outs=[nxt], at=av, flags=flags))
        if op is _sre.BRANCH:
            return self._new(_State("split", outs=[self._build(alt, nxt, flags) for alt in av[1]]))  # type: ignore[index]
        if op is _sre.SUBPATTERN:
            _group, add, remove, body = av  # type: ignore[misc]
            return self._build(body, nxt, (flags | add) & ~remove)
        lo, hi, body = av  # type: ignore[misc]  # MAX_REPEAT / MIN_REPEAT: greed does not change whether a match exists
        if hi is _sre.MAXREPEAT:
            loop = self._new(_State("split"))
            self._states[loop].outs = [self._build(body, loop, flags), nxt]
            nxt = loop
        else:
            for _ in range(hi - lo):
                nxt = self._new(_State("split", outs=[self._build(body, nxt, flags), nxt]))
        for _ in range(lo):
            nxt = self._build(body, nxt, flags)
        return nxt

    # -- matching --------------------------------------------------------------------------

    def _holds(self, at: object, flags: int, name: str, pos: int) -> bool:
        n = len(name)
        if at is _sre.AT_BEGINNING_STRING:
            return pos == 0
        if at is _sre.AT_BEGINNING:
            return pos == 0 or (bool(flags & re.MULTILINE) and name[pos - 1] == "\n")
        if at is _sre.AT_END_STRING:
            return pos == n
        if at is _sre.AT_END:
            if pos == n or (pos == n - 1 and name[pos] == "\n"):
                return True
            return bool(flags & re.MULTILINE) and name[pos] == "\n"
        if n == 0:  # as in sre: neither \b nor \B holds in an empty string
            return False
        before = pos > 0 and self._word.match(name[pos - 1]) is not None
        after = pos < n and self._word.match(name[pos]) is not None
        if at is _sre.AT_BOUNDARY:
            return before != after
        if at is _sre.AT_NON_BOUNDARY:
            return before == after
        raise PatternError(f"unsupported anchor {at}")  # pragma: no cover - the parser makes no other

    def _closure(self, seeds: Iterable[int], name: str, pos: int) -> set[int]:
        """Char and accept states reachable from ``seeds`` without consuming a character."""
        seen: set[int] = set()
        out: set[int] = set()
        stack = list(seeds)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            self.steps += 1
            st = self._states[s]
            if st.kind == "split":
                stack.extend(st.outs)
            elif st.kind == "assert":
                if self._holds(st.at, st.flags, name, pos):
                    stack.append(st.outs[0])
            else:
                out.add(s)
        return out

    @staticmethod
    def _fixed_key(parsed: object) -> list[str | None] | None:
        """For a key of plain characters and ``.`` only (a module path, the common case), the
        key as a list of characters (None for ``.``); else None."""
        data = list(parsed.data)  # type: ignore[attr-defined]
        # Expected: [(.*\.)?, (SUBPATTERN, (2, add, del, key items)), (AT, AT_END)]; a key such
        # as "a)|(b" parses to something else and takes the general path.
        if len(data) != 3 or data[1][0] is not _sre.SUBPATTERN or data[2] != (_sre.AT, _sre.AT_END):
            return None
        _, add, remove, items = data[1][1]
        if add or remove or parsed.state.flags & ~re.UNICODE:  # type: ignore[attr-defined]
            return None
        if not all(op is _sre.LITERAL or op is _sre.ANY for op, _ in items):
            return None
        return [chr(av) if op is _sre.LITERAL else None for op, av in items]

    def _step(self, current: frozenset[int], ch: str, name: str, pos: int) -> frozenset[int]:
        moved = [self._states[s].outs[0] for s in current if self._states[s].kind == "char" and self._states[s].test(ch)]  # type: ignore[misc]
        self.steps += len(current)
        return frozenset(self._closure(moved, name, pos + 1)) if moved else frozenset()

    def matches(self, name: str) -> bool:
        """``re.match(rf"(.*\\.)?({key})$", name) is not None``, without backtracking."""
        newline = "\n" in name
        if self._fixed is not None and not newline:
            # (.*\.)?(key)$: the key matches the name's tail, and what precedes it is empty or
            # ends with a dot (.* crosses no newline, and there is none).
            k = len(self._fixed)
            self.steps += k
            if k > len(name) or (k < len(name) and name[-k - 1] != "."):
                return False
            return all(c is None or c == d for c, d in zip(self._fixed, name[len(name) - k:]))
        current = frozenset(self._closure([self.start], name, 0))
        cached = self._cacheable and not newline
        if len(self._dfa) > 4 * MAX_STATES:  # bound the memo; each miss costs O(states) again
            self._dfa.clear()
        for pos, ch in enumerate(name):
            if self._accept in current:
                return True
            if cached:
                key = (current, ch, pos + 1 == len(name))
                nxt = self._dfa.get(key)
                if nxt is None:
                    nxt = self._dfa[key] = self._step(current, ch, name, pos)
            else:
                nxt = self._step(current, ch, name, pos)
            if not nxt:
                return False
            current = nxt
        return self._accept in current


def compile_key(key: str) -> KeyMatcher:
    """A :class:`KeyMatcher` for ``key``; :class:`PatternError` says why a key is refused."""
    return KeyMatcher(key)


V = TypeVar("V")


def pattern_key(patterns: Mapping[str, V], matchers: Mapping[str, KeyMatcher], name: str) -> str | None:
    """The key of ``patterns`` that PEFT would pick for module ``name``, or None.

    ``matchers`` holds a compiled :class:`KeyMatcher` per key. Mirrors ``get_pattern_key``
    followed by ``patterns.get(...)``: the first key (in map order) that matches; failing that,
    ``name`` itself when it is a key (a key with regex metacharacters matches itself literally
    only through this lookup).
    """
    for key in patterns:
        if matchers[key].matches(name):
            return key
    return name if name in patterns else None
