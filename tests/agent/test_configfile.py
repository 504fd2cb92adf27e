"""The one TOML → frozen-dataclass decoder both roles use: every supported type, every message form."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from capmon.agent.configfile import ConfigError, Where, bounds, check_sections, decode, parse_toml, read_toml


@dataclass(frozen=True)
class Inner:
    name: str = ""
    weight: float = field(default=1.0, metadata=bounds(gt=0))


@dataclass(frozen=True)
class Section:
    flag: bool = False
    count: int = field(default=1, metadata=bounds(ge=1, le=10))
    ratio: float = 0.5
    text: str = ""
    names: tuple[str, ...] = ()
    pair: tuple[int, str] = (0, "")
    table: Mapping[str, float] = field(default_factory=dict, metadata=bounds(ge=0))
    kind: Literal["a", "b"] = "a"
    maybe: float | None = None
    either: int | str = 0
    anything: Any = None
    inner: Inner = field(default_factory=Inner)
    inners: tuple[Inner, ...] = ()
    token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.text == "forbidden":
            raise ValueError("text may not be 'forbidden'")


HERE = Where("f.toml", "s")


def test_every_type_decodes():
    s = decode(
        Section,
        parse_toml(
            """
flag = true
count = 3
ratio = 2
text = "t"
names = ["x", "y"]
pair = [1, "one"]
table = { a = 1, b = 2.5 }
kind = "b"
maybe = 4
either = "word"
anything = [1, "two"]
inner = { name = "n", weight = 3 }
inners = [{ name = "p" }, { weight = 0.5 }]
""",
            "f.toml",
        ),
        HERE,
    )
    assert s.flag is True and s.count == 3 and s.ratio == 2.0 and isinstance(s.ratio, float)
    assert s.names == ("x", "y") and s.pair == (1, "one") and dict(s.table) == {"a": 1.0, "b": 2.5}
    assert s.kind == "b" and s.maybe == 4.0 and s.either == "word" and s.anything == (1, "two")
    assert s.inner == Inner("n", 3.0) and s.inners == (Inner("p"), Inner("", 0.5))
    with pytest.raises(TypeError):
        s.table["c"] = 1  # decoded once, frozen: nobody edits it later


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"flag": 1}, "f.toml: [s] flag: must be true or false, got 1"),
        ({"count": True}, "f.toml: [s] count: must be an integer, got True"),
        ({"count": 1.5}, "f.toml: [s] count: must be an integer, got 1.5"),
        ({"count": 0}, "f.toml: [s] count: must be 1..10, got 0"),
        ({"count": 11}, "f.toml: [s] count: must be 1..10, got 11"),
        ({"ratio": "x"}, "f.toml: [s] ratio: must be a number, got 'x'"),
        ({"ratio": float("nan")}, "f.toml: [s] ratio: must be a finite number, got nan"),
        ({"text": 3}, "f.toml: [s] text: must be a string, got 3"),
        ({"names": "x"}, "f.toml: [s] names: must be a list, got 'x'"),
        ({"names": ["x", 2]}, "f.toml: [s] names[1]: must be a string, got 2"),
        ({"pair": [1]}, "f.toml: [s] pair: must be a list of 2, got 1"),
        ({"table": [1]}, "f.toml: [s] table: must be a table, got a list"),
        ({"table": {"a": "1"}}, "f.toml: [s] table.a: must be a number, got '1'"),
        ({"table": {"a": -1}}, "f.toml: [s] table.a: must be ≥ 0, got -1"),
        ({"kind": "c"}, "f.toml: [s] kind: must be one of 'a', 'b', got 'c'"),
        ({"maybe": "x"}, "f.toml: [s] maybe: must be a number, got 'x'"),
        ({"either": 1.5}, "f.toml: [s] either: must be an integer or a string, got 1.5"),
        ({"inner": 1}, "f.toml: [s] inner: must be a table, got 1"),
        ({"inner": {"weight": 0}}, "f.toml: [s] inner.weight: must be > 0, got 0"),
        (
            {"inners": [{}, {"nmae": "x"}]},
            "f.toml: [s] inners[1]: unknown key 's.inners[1].nmae' (known: name, weight); did you mean 'name'?",
        ),
        ({"text": "forbidden"}, "f.toml: [s]: text may not be 'forbidden'"),
        ({"token": ["s3cret"]}, "f.toml: [s] token: must be a string, got a list"),
        ({"token": 12345}, "f.toml: [s] token: must be a string, got an integer"),
        (
            {"bogus": 1},
            "f.toml: [s]: unknown key 's.bogus' (known: anything, count, either, flag, inner, inners, "
            "kind, maybe, names, pair, ratio, table, text, token)",
        ),
    ],
)
def test_each_problem_names_file_section_key_and_reason(table, message):
    with pytest.raises(ConfigError) as exc:
        decode(Section, table, HERE)
    assert str(exc.value) == message


def test_a_section_that_is_not_a_table():
    with pytest.raises(ConfigError, match=re.escape("f.toml: [s]: must be a table, got 3")):
        decode(Section, 3, HERE)


def test_the_older_prefix_string_reads_the_same():
    with pytest.raises(ConfigError) as exc:
        decode(Inner, {"nmae": 1}, "agent.toml: [probes.mock]")
    assert (
        str(exc.value)
        == "agent.toml: [probes.mock]: unknown key 'probes.mock.nmae' (known: name, weight); did you mean 'name'?"
    )


def test_files_and_sections(tmp_path):
    with pytest.raises(ConfigError, match=r"^.*missing\.toml: no such file$"):
        read_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("a = = 1")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: not valid TOML: "):
        read_toml(bad)
    with pytest.raises(ConfigError) as exc:
        check_sections({"agnet": {}}, ["agent", "spool"], "a.toml")
    assert str(exc.value) == "a.toml: unknown section [agnet] (known: agent, spool); did you mean 'agent'?"


def test_config_error_is_a_value_error():
    """Callers that catch ValueError (the agent CLI, the probe registry) keep catching it."""
    assert issubclass(ConfigError, ValueError)


def test_a_near_miss_key_or_section_says_what_was_meant(tmp_path):
    from capmon.agent.config import load_config

    path = tmp_path / "agent.toml"
    path.write_text("[agent]\nwindows_s = 5\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'agent.windows_s' \(known: .*\); did you mean 'window_s'\?$"
    ):
        load_config(path, env={})
    path.write_text("[clasifier]\n")
    with pytest.raises(
        ConfigError, match=r"unknown section \[clasifier\] \(known: .*\); did you mean 'classifier'\?$"
    ):
        load_config(path, env={})
