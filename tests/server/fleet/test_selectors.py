"""The selector language: what parses, what it matches, and where a bad one goes wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import InvalidInputError
from server.fleet.errors import SelectorError
from server.fleet.selectors import (
    FIELDS,
    And,
    Compare,
    Node,
    Not,
    Or,
    Selector,
    check_tags,
    parse,
)

BERLIN_ARM = {
    "id": "cam-1",
    "profile": "edge-arm64-litert",
    "arch": "aarch64",
    "runtime": "litert",
    "runtime_version": "2.3.0",
    "agent_version": "0.1.0",
    "status": "accepted",
    "online": "true",
    "site": "berlin",
    "line": "press 2",
}
PARIS_X86 = {
    **BERLIN_ARM,
    "id": "gw-9",
    "profile": "edge-x86_64-litert",
    "arch": "x86_64",
    "online": "false",
    "site": "paris",
}
UNTAGGED = {k: v for k, v in BERLIN_ARM.items() if k not in ("site", "line")}


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("profile=edge-arm64-litert and site=berlin", [True, False, False]),
        ("site in (berlin, paris)", [True, True, False]),
        ("site in (berlin, paris,)", [True, True, False]),
        ("site not in (paris)", [True, False, True]),  # absent tag: not in matches
        ("site!=paris", [True, False, True]),  # absent tag: != matches
        ("site=berlin or online=false", [True, True, False]),
        ("not (site=berlin or online=false)", [False, False, True]),
        ("NOT site == berlin AND arch = aarch64", [False, False, True]),
        ('line="press 2"', [True, True, False]),
        ("line='press 2' and runtime_version=2.3.0", [True, True, False]),
        ("(site=berlin or site=paris) and not arch=x86_64", [True, False, False]),
        ("id=gw-9 or id in (cam-1)", [True, True, True]),
        ("status=accepted and runtime=litert and agent_version=0.1.0", [True, True, True]),
    ],
)
def test_valid_selectors_match_as_documented(text: str, matches: list[bool]) -> None:
    selector = parse(text)
    assert [selector.matches(f) for f in (BERLIN_ARM, PARIS_X86, UNTAGGED)] == matches
    assert parse(str(selector)) == selector  # the canonical text says the same


def test_canonical_form() -> None:
    assert str(parse("  site = berlin AND (a=1 OR b=2) ")) == "site=berlin and (a=1 or b=2)"
    assert str(parse("(a=1 and b=2) and c=3")) == "a=1 and b=2 and c=3"
    assert str(parse('x in ( \'and\' , "q\\"uote" )')) == 'x in ("and", "q\\"uote")'
    assert parse("site=berlin and profile=edge-arm64-litert").names() == {"site", "profile"}


@pytest.mark.parametrize(
    ("text", "position", "problem"),
    [
        ("", 0, "the selector is empty"),
        ("site=", 5, "expected a value after '=', found the end"),
        ("site=berlin and", 15, "expected a field or tag name, found the end"),
        ("site=berlin profile=x", 12, "expected 'and', 'or' or the end, found 'profile'"),
        ("site berlin", 5, "expected '=', '!=', 'in' or 'not in' after 'site'"),
        ("site=berlin and (profile=x", 26, "expected ')' to close the '(' at position 16"),
        ("site in berlin", 8, "expected '(' after 'in'"),
        ("site in (a b)", 11, "expected ',' or ')' in the list opened at position 8"),
        ("site not berlin", 9, "expected 'in' after 'not' after 'site'"),
        ("site=berlin & x=1", 12, "unexpected character '&'"),
        ("site='berlin", 5, "the string opened with ' is never closed"),
        ("site=and", 5, "expected a value after '=', found 'and' (quote it if it is a keyword)"),
        ("online=yes", 7, "online is true or false, not 'yes'"),
        ("status in (accepted, gone)", 21, "status is pending or accepted or rejected or revoked"),
        ("9lives=1", 0, "'9lives' is not a field or tag name"),
        ("(" * 40 + "a=1" + ")" * 40, 32, "nested more than 32 levels deep"),
    ],
)
def test_invalid_selectors_name_the_problem_and_its_position(
    text: str, position: int, problem: str
) -> None:
    with pytest.raises(SelectorError) as caught:
        parse(text)
    assert caught.value.position == position
    assert problem in str(caught.value)
    assert f"at position {position}" in str(caught.value)
    assert isinstance(caught.value, InvalidInputError)  # the API answers 422


def test_a_too_long_selector_is_refused() -> None:
    with pytest.raises(SelectorError, match="longer than 2048"):
        parse("a=1 or " * 400 + "a=2")


def test_tags_cannot_shadow_fields_or_keywords() -> None:
    assert check_tags({"site": "berlin", "rack.row": "3", "_x": "y"}) == {
        "site": "berlin",
        "rack.row": "3",
        "_x": "y",
    }
    for key in (*FIELDS, "and", "In", "1st", "a b", "", "x" * 64):
        with pytest.raises(InvalidInputError):
            check_tags({key: "v"})
    with pytest.raises(InvalidInputError, match="control character"):
        check_tags({"site": "ber\nlin"})
    with pytest.raises(InvalidInputError, match="at most 32 tags"):
        check_tags({f"t{i}": "v" for i in range(33)})


# ----------------------------------------------------------------------------- properties

names = st.sampled_from(["site", "line", "rack.row", "profile", "arch", "_zone", "id"])
values = st.one_of(
    st.sampled_from(["berlin", "paris", "2.3.0", "edge-arm64-litert", "and", "", "a b", 'q"t']),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=8),
)
compares = st.one_of(
    st.builds(lambda n, op, v: Compare(n, op, (v,)), names, st.sampled_from(["=", "!="]), values),
    st.builds(
        lambda n, op, vs: Compare(n, op, tuple(vs)),
        names,
        st.sampled_from(["in", "not in"]),
        st.lists(values, min_size=1, max_size=3),
    ),
)


def _extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    def flat(kind: type[And] | type[Or], items: list[Node]) -> Node:
        out: list[Node] = []
        for item in items:
            out.extend(item.items if isinstance(item, kind) else (item,))
        return kind(tuple(out))

    return st.one_of(
        st.builds(Not, children),
        st.builds(lambda xs: flat(And, xs), st.lists(children, min_size=2, max_size=3)),
        st.builds(lambda xs: flat(Or, xs), st.lists(children, min_size=2, max_size=3)),
    )


trees = st.recursive(compares, _extend, max_leaves=8)
facts = st.dictionaries(names, st.sampled_from(["berlin", "paris", "", "a b"]), max_size=4)


@given(trees, facts)
def test_the_canonical_text_parses_back_to_the_same_tree(
    tree: Node, device: dict[str, str]
) -> None:
    selector = Selector(tree)
    parsed = parse(str(selector))
    assert parsed == selector
    assert parsed.matches(device) == tree.matches(device)


@given(st.text(alphabet="ab =!()',\"inotdrx\\", max_size=40))
def test_any_text_parses_or_says_where_it_fails(text: str) -> None:
    try:
        selector = parse(text)
    except SelectorError as e:
        assert 0 <= e.position <= len(text)
    else:
        assert parse(str(selector)) == selector
