"""The selector language of dynamic groups, and the rules for tag names: pure, no I/O.

A selector picks devices by their inventory and tags::

    profile=edge-arm64-litert and site=berlin
    site in (berlin, hamburg) and not (online=false or runtime_version!=2.3.0)
    line!="press 2"

Grammar (keywords are case-insensitive, names and values case-sensitive)::

    selector := or
    or       := and ("or" and)*
    and      := unary ("and" unary)*
    unary    := "not" unary | "(" or ")" | compare
    compare  := NAME ("=" | "==" | "!=") VALUE
              | NAME ["not"] "in" "(" VALUE ("," VALUE)* [","] ")"
    VALUE    := a bare word of letters, digits and _ . : / @ + -
              | a string in "double" or 'single' quotes (backslash escapes the next character)

A NAME is an inventory field (:data:`FIELDS`: ``id``, ``profile``, ``arch``,
``runtime``, ``runtime_version``, ``agent_version``, ``status``, ``online``) or a
tag name. As in Kubernetes label selectors, ``!=`` and ``not in`` also match a
device that does not have the tag at all; ``=`` and ``in`` never do.

What always holds:

- :func:`parse` either returns a :class:`Selector` or raises
  :class:`~server.fleet.errors.SelectorError` whose ``position`` (0-based, at most
  ``len(text)``) points at the problem; it never raises anything else.
- ``str(selector)`` is a canonical form: ``parse(str(s)) == s`` for every parsed ``s``.
- Tag names can never shadow an inventory field or a keyword (:func:`check_tags`
  refuses them), so every name in a selector means one thing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from server.errors import InvalidInputError
from server.fleet.errors import SelectorError

__all__ = [
    "FIELDS",
    "KEYWORDS",
    "MAX_SELECTOR_LENGTH",
    "MAX_TAGS",
    "And",
    "Compare",
    "Node",
    "Not",
    "Or",
    "Selector",
    "check_tag_key",
    "check_tags",
    "parse",
]

FIELDS = (
    "id",
    "profile",
    "arch",
    "runtime",
    "runtime_version",
    "agent_version",
    "status",
    "online",
)
KEYWORDS = ("and", "or", "not", "in")
MAX_SELECTOR_LENGTH = 2048
MAX_DEPTH = 32
MAX_TAGS = 32
MAX_TAG_VALUE_LENGTH = 128
_STATUSES = ("pending", "accepted", "rejected", "revoked")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,62}")
_WORD_CHARS = re.compile(r"[A-Za-z0-9_.:/@+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Op = Literal["=", "!=", "in", "not in"]


# ----------------------------------------------------------------------------- tags


def check_tag_key(key: str) -> str:
    """``key`` if it can be a tag name, else :class:`InvalidInputError` saying why."""
    if not isinstance(key, str) or not _NAME.fullmatch(key):
        raise InvalidInputError(
            f"invalid tag name {key!r}: use 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'"
        )
    if key in FIELDS or key.lower() in KEYWORDS:
        raise InvalidInputError(
            f"tag name {key!r} is reserved: it is an inventory field or a selector keyword"
        )
    return key


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Validated tags (at most :data:`MAX_TAGS`; values 1-128 characters, no control
    characters); every problem is named in one :class:`InvalidInputError`."""
    problems = []
    if len(tags) > MAX_TAGS:
        problems.append(f"at most {MAX_TAGS} tags, not {len(tags)}")
    for key, value in tags.items():
        try:
            check_tag_key(key)
        except InvalidInputError as e:
            problems.append(str(e))
        if not isinstance(value, str) or not 1 <= len(value) <= MAX_TAG_VALUE_LENGTH:
            problems.append(f"tag {key!r}: the value must be 1-{MAX_TAG_VALUE_LENGTH} characters")
        elif _CONTROL.search(value):
            problems.append(f"tag {key!r}: the value contains a control character")
    if problems:
        raise InvalidInputError("; ".join(problems))
    return dict(tags)


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class Compare:
    name: str
    op: Op
    values: tuple[str, ...]

    def matches(self, facts: Mapping[str, str]) -> bool:
        value = facts.get(self.name)
        if self.op == "=":
            return value is not None and value == self.values[0]
        if self.op == "!=":
            return value != self.values[0]
        if self.op == "in":
            return value is not None and value in self.values
        return value not in self.values

    def __str__(self) -> str:
        if self.op in ("=", "!="):
            return f"{self.name}{self.op}{_quote(self.values[0])}"
        return f"{self.name} {self.op} ({', '.join(_quote(v) for v in self.values)})"


@dataclass(frozen=True, slots=True)
class And:
    items: tuple[Node, ...]

    def matches(self, facts: Mapping[str, str]) -> bool:
        return all(item.matches(facts) for item in self.items)

    def __str__(self) -> str:
        return " and ".join(_wrap(item, (Or,)) for item in self.items)


@dataclass(frozen=True, slots=True)
class Or:
    items: tuple[Node, ...]

    def matches(self, facts: Mapping[str, str]) -> bool:
        return any(item.matches(facts) for item in self.items)

    def __str__(self) -> str:
        return " or ".join(_wrap(item, (Or,)) for item in self.items)


@dataclass(frozen=True, slots=True)
class Not:
    item: Node

    def matches(self, facts: Mapping[str, str]) -> bool:
        return not self.item.matches(facts)

    def __str__(self) -> str:
        return "not " + _wrap(self.item, (And, Or))


Node = Compare | And | Or | Not


def _wrap(node: Node, kinds: tuple[type, ...]) -> str:
    return f"({node})" if isinstance(node, kinds) else str(node)


def _quote(value: str) -> str:
    if _WORD_CHARS.fullmatch(value) and value.lower() not in KEYWORDS:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed selector; ``matches(facts)`` on a device's :meth:`Device.facts`."""

    root: Node

    def matches(self, facts: Mapping[str, str]) -> bool:
        return self.root.matches(facts)

    def names(self) -> set[str]:
        """Every field or tag name the selector looks at."""
        found: set[str] = set()
        stack: list[Node] = [self.root]
        while stack:
            node = stack.pop()
            if isinstance(node, Compare):
                found.add(node.name)
            elif isinstance(node, Not):
                stack.append(node.item)
            else:
                stack.extend(node.items)
        return found

    def __str__(self) -> str:
        return str(self.root)


# ----------------------------------------------------------------------------- tokens

_Kind = Literal["(", ")", ",", "=", "!=", "word", "string", "keyword", "end"]


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Kind
    text: str  # the value for words and strings, the lower-cased keyword for keywords
    position: int

    def describe(self) -> str:
        if self.kind == "end":
            return "the end"
        if self.kind == "string":
            return f"the string {_quote(self.text)}"
        return f"{self.text!r}"


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char.isspace():
            i += 1
        elif char in "(),":
            tokens.append(_Token(char, char, i))  # type: ignore[arg-type]
            i += 1
        elif text.startswith("!=", i):
            tokens.append(_Token("!=", "!=", i))
            i += 2
        elif text.startswith("==", i):
            tokens.append(_Token("=", "=", i))
            i += 2
        elif char == "=":
            tokens.append(_Token("=", "=", i))
            i += 1
        elif char in "\"'":
            start, i = i, i + 1
            value: list[str] = []
            while i < n and text[i] != char:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
            if i >= n:
                raise SelectorError(
                    f"the string opened with {char} is never closed", text=text, position=start
                )
            tokens.append(_Token("string", "".join(value), start))
            i += 1
        elif match := _WORD_CHARS.match(text, i):
            word = match.group(0)
            if word.lower() in KEYWORDS:
                tokens.append(_Token("keyword", word.lower(), i))
            else:
                tokens.append(_Token("word", word, i))
            i = match.end()
        else:
            raise SelectorError(f"unexpected character {char!r}", text=text, position=i)
    tokens.append(_Token("end", "", n))
    return tokens


# ----------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def fail(self, problem: str, token: _Token | None = None) -> SelectorError:
        return SelectorError(problem, text=self.text, position=(token or self.peek()).position)

    def at_keyword(self, word: str) -> bool:
        return self.peek().kind == "keyword" and self.peek().text == word

    def parse(self) -> Node:
        if self.peek().kind == "end":
            raise self.fail("the selector is empty")
        node = self.parse_or()
        if self.peek().kind != "end":
            raise self.fail(f"expected 'and', 'or' or the end, found {self.peek().describe()}")
        return node

    def parse_or(self) -> Node:
        items = [self.parse_and()]
        while self.at_keyword("or"):
            self.take()
            items.append(self.parse_and())
        return _flat(Or, items)

    def parse_and(self) -> Node:
        items = [self.parse_unary()]
        while self.at_keyword("and"):
            self.take()
            items.append(self.parse_unary())
        return _flat(And, items)

    def parse_unary(self) -> Node:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep")
        try:
            token = self.peek()
            if self.at_keyword("not"):
                self.take()
                return Not(self.parse_unary())
            if token.kind == "(":
                self.take()
                node = self.parse_or()
                if self.peek().kind != ")":
                    raise self.fail(
                        f"expected ')' to close the '(' at position {token.position}, "
                        f"found {self.peek().describe()}"
                    )
                self.take()
                return node
            return self.parse_compare()
        finally:
            self.depth -= 1

    def parse_compare(self) -> Compare:
        token = self.take()
        if token.kind != "word":
            raise self.fail(f"expected a field or tag name, found {token.describe()}", token)
        name = token.text
        if name not in FIELDS and not _NAME.fullmatch(name):
            raise self.fail(
                f"{name!r} is not a field or tag name (letters, digits, '_', '.' or '-', "
                "starting with a letter or '_')",
                token,
            )
        op_token = self.take()
        if op_token.kind in ("=", "!="):
            value = self.take_value(f"after '{op_token.text}'")
            return self.checked(Compare(name, op_token.kind, (value.text,)), [value])
        negated = op_token.kind == "keyword" and op_token.text == "not"
        if negated:
            op_token = self.take()
        if op_token.kind == "keyword" and op_token.text == "in":
            values = self.take_list()
            return self.checked(
                Compare(name, "not in" if negated else "in", tuple(v.text for v in values)), values
            )
        wanted = "'in' after 'not'" if negated else "'=', '!=', 'in' or 'not in'"
        raise self.fail(f"expected {wanted} after {name!r}, found {op_token.describe()}", op_token)

    def take_value(self, where: str) -> _Token:
        token = self.take()
        if token.kind not in ("word", "string"):
            hint = " (quote it if it is a keyword)" if token.kind == "keyword" else ""
            raise self.fail(f"expected a value {where}, found {token.describe()}{hint}", token)
        return token

    def take_list(self) -> list[_Token]:
        opening = self.take()
        if opening.kind != "(":
            raise self.fail(f"expected '(' after 'in', found {opening.describe()}", opening)
        values = [self.take_value("in the list")]
        while self.peek().kind == ",":
            self.take()
            if self.peek().kind == ")":
                break
            values.append(self.take_value("after ','"))
        closing = self.take()
        if closing.kind != ")":
            raise self.fail(
                f"expected ',' or ')' in the list opened at position {opening.position}, "
                f"found {closing.describe()}",
                closing,
            )
        return values

    def checked(self, compare: Compare, values: list[_Token]) -> Compare:
        allowed = {"online": ("true", "false"), "status": _STATUSES}.get(compare.name)
        if allowed is not None:
            for token in values:
                if token.text not in allowed:
                    raise self.fail(
                        f"{compare.name} is {' or '.join(allowed)}, not {token.text!r}", token
                    )
        return compare


def _flat(kind: type[And] | type[Or], items: list[Node]) -> Node:
    if len(items) == 1:
        return items[0]
    flat: list[Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, kind) else (item,))
    return kind(tuple(flat))


def parse(text: str) -> Selector:
    """Parse a selector, or raise :class:`SelectorError` naming the problem and its position."""
    if not isinstance(text, str):
        raise SelectorError("a selector is text", text=str(text), position=0)
    if len(text) > MAX_SELECTOR_LENGTH:
        raise SelectorError(
            f"longer than {MAX_SELECTOR_LENGTH} characters", text=text, position=MAX_SELECTOR_LENGTH
        )
    return Selector(_Parser(text).parse())
