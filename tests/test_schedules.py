import math
import subprocess
import sys

import pytest

from gloro import schedules


def _lin(v0, v1, u):
    return v0 + (v1 - v0) * u


def _log(v0, v1, u):
    return v0 * (v1 / v0) ** u


def _cos(v0, v1, u):
    return v1 + (v0 - v1) * (1 + math.cos(math.pi * u)) / 2


@pytest.mark.parametrize(
    "spec, t, expected",
    [
        # lin between 0% and 50%, then hold.
        ("[0]-lin-[50%:2]", 0.0, 0.0),
        ("[0]-lin-[50%:2]", 0.1, _lin(0, 2, 0.2)),
        ("[0]-lin-[50%:2]", 0.3, _lin(0, 2, 0.6)),
        ("[0]-lin-[50%:2]", 0.5, 2.0),
        ("[0]-lin-[50%:2]", 0.9, 2.0),
        # log over the whole run, with scientific notation.
        ("[1e-3]-log-[1]", 0.0, 1e-3),
        ("[1e-3]-log-[1]", 0.25, _log(1e-3, 1, 0.25)),
        ("[1e-3]-log-[1]", 0.7, _log(1e-3, 1, 0.7)),
        ("[1e-3]-log-[1]", 1.0, 1.0),
        ("[0.01]-log-[50%:1.1]", 0.0, 0.01),
        ("[0.01]-log-[50%:1.1]", 0.2, _log(0.01, 1.1, 0.4)),
        ("[0.01]-log-[50%:1.1]", 0.5, 1.1),
        ("[0.01]-log-[50%:1.1]", 0.75, 1.1),
        # cos between explicit positions, with holds on both sides.
        ("[20%:4]-cos-[60%:1]", 0.0, 4.0),
        ("[20%:4]-cos-[60%:1]", 0.2, 4.0),
        ("[20%:4]-cos-[60%:1]", 0.3, _cos(4, 1, 0.25)),
        ("[20%:4]-cos-[60%:1]", 0.4, _cos(4, 1, 0.5)),
        ("[20%:4]-cos-[60%:1]", 0.5, _cos(4, 1, 0.75)),
        ("[20%:4]-cos-[60%:1]", 0.6, 1.0),
        ("[20%:4]-cos-[60%:1]", 1.0, 1.0),
        # No interpolation: hold, then step at the next point.
        ("[1]-[50%:0.1]", 0.0, 1.0),
        ("[1]-[50%:0.1]", 0.49, 1.0),
        ("[1]-[50%:0.1]", 0.5, 0.1),
        ("[1]-[50%:0.1]", 1.0, 0.1),
        ("[1]-[50%:0.1]-[0.01]", 0.99, 0.1),
        ("[1]-[50%:0.1]-[0.01]", 1.0, 0.01),
        # Equal positions: an instantaneous jump, even with an interpolation.
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.25, 0.5),
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.5, 3.0),
        ("[0]-lin-[50%:1]-[50%:3]-lin-[5]", 0.75, 4.0),
        ("[0]-lin-[50%:1]-lin-[50%:3]", 0.5, 3.0),
        # Several segments.
        ("[1.]-[50%:1.]-cos-[0.001]", 0.25, 1.0),
        ("[1.]-[50%:1.]-cos-[0.001]", 0.75, _cos(1, 0.001, 0.5)),
        ("[1.]-[50%:1.]-cos-[0.001]", 1.0, 0.001),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.125, 0.5),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.5, 1.0),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 0.875, _lin(1, 0.1, 0.5)),
        ("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]", 1.0, 0.1),
        ("[2.5]", 0.0, 2.5),
        ("[2.5]", 1.0, 2.5),
        ("[50%:2.5]", 0.0, 2.5),
        # Whitespace is tolerated.
        (" [ 0 ] - lin - [ 50 % : 1 ] ", 0.25, 0.5),
    ],
)
def test_values(spec, t, expected):
    value = schedules.parse(spec)(t)
    assert type(value) is float
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    "keyword, equivalent",
    [
        ("fixed", "[1.]"),
        ("linear", "[0.]-lin-[50%:1.]"),
        ("logarithmic", "[0.01]-log-[50%:1.]"),
        ("cosine", "[1.]-cos-[0.]"),
    ],
)
def test_keywords(keyword, equivalent):
    s, e = schedules.parse(keyword), schedules.parse(equivalent)
    for t in [i / 20 for i in range(21)]:
        assert s(t) == e(t)


def test_keyword_values():
    assert schedules.parse("fixed")(0.3) == 1.0
    assert schedules.parse("linear")(0.25) == pytest.approx(0.5)
    assert schedules.parse("linear")(0.8) == 1.0
    assert schedules.parse("logarithmic")(0.25) == pytest.approx(0.1)
    assert schedules.parse("cosine")(0.5) == pytest.approx(0.5)
    assert schedules.parse("cosine")(1.0) == 0.0


@pytest.mark.parametrize("t, clamped", [(-1.0, 0.0), (2.0, 1.0), (-math.inf, 0.0)])
def test_clamps_t(t, clamped):
    s = schedules.parse("[0]-lin-[1]")
    assert s(t) == s(clamped) == clamped


def test_spec_str_repr():
    spec = "[0.01]-log-[50%:1.1]"
    s = schedules.parse(spec)
    assert s.spec == spec
    assert str(s) == spec
    assert repr(s) == f"Schedule(spec={spec!r})"


def test_parse_is_idempotent():
    s = schedules.parse("linear")
    assert schedules.parse(s) is s
    assert isinstance(s, schedules.Schedule)


def test_equality_and_hash():
    assert schedules.parse("[0]-lin-[1]") == schedules.parse("[0]-lin-[1]")
    assert hash(schedules.parse("cosine")) == hash(schedules.parse("cosine"))
    assert schedules.parse("[0]-lin-[1]") != schedules.parse("[0]-lin-[100%:1]")
    assert schedules.parse("fixed") != "fixed"


def test_is_immutable():
    s = schedules.parse("fixed")
    with pytest.raises(AttributeError):
        s.spec = "linear"


@pytest.mark.parametrize(
    "args, t",
    [
        ((0, 0, 10, 100), 0.0),
        ((1, 50, 4, 100), 1.5 / 4),
        ((3, 99, 4, 100), (3 + 0.99) / 4),
        ((2, 37, 4, None), 0.5),
        ((4, 0, 4, None), 1.0),
    ],
)
def test_at(args, t):
    s = schedules.parse("[0]-lin-[1]")
    assert s.at(*args) == pytest.approx(t)


def test_at_keywords():
    s = schedules.parse("[0]-lin-[1]")
    assert s.at(1, 5, epochs=2, steps_per_epoch=10) == pytest.approx(0.75)
    assert s.at(1, 5, epochs=2) == pytest.approx(0.5)


def test_at_rejects_no_epochs():
    with pytest.raises(ValueError, match="epochs"):
        schedules.parse("fixed").at(0, 0, 0)


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("constant", "unknown keyword 'constant'"),
        ("log", "unknown keyword 'log'"),
        ("Linear", "unknown keyword 'Linear'"),
        ("fixed-[1]", "expected a point"),
        ("[0]-foo-[1]", "unknown interpolation 'foo'"),
        ("[x]", "bad number 'x'"),
        ("[]", "bad number ''"),
        ("[1.2.3]", "bad number '1.2.3'"),
        ("[50%:]", "bad number ''"),
        ("[nan]", "bad number 'nan'"),
        ("[1e999]", "too large"),
        ("[0]-[1]-[2]", "point 2 needs a position"),
        ("[0]-lin-[1]-lin-[2]", "point 2 needs a position"),
        ("[50%:1]-[25%:2]", "positions must not decrease"),
        ("[0]-lin-[60%:1]-[40%:2]-[3]", "positions must not decrease"),
        ("[0]-log-[1]", "'log' needs values > 0"),
        ("[1]-log-[0.]", "'log' needs values > 0"),
        ("[0]-", "trailing '-'"),
        ("[0]-lin-", "trailing '-'"),
        ("[0]-lin", "trailing 'lin'"),
        ("-[0]", "expected a point"),
        ("[0]--[1]", "expected a point"),
        ("[0]-lin-lin-[1]", "expected a point"),
        ("[0][1]", "expected '-'"),
        ("[0]-lin[1]", "expected '-'"),
        ("[150%:1]", "over 100%"),
        ("[100.5%:1]", "over 100%"),
        ("[-1]", "negative value"),
        ("[-5%:1]", "negative position"),
        ("[0]-lin-[-1]", "negative value"),
        ("[50:1]", "must be a percentage"),
        ("[1%:2:3]", "more than one ':'"),
        ("[0", "unbalanced '['"),
        ("[0]]", "unbalanced ']'"),
        ("0.5", "unexpected character '0'"),
        ("[0]+[1]", "unexpected character '+'"),
    ],
)
def test_malformed(spec, reason):
    with pytest.raises(ValueError) as info:
        schedules.parse(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert reason in message


@pytest.mark.parametrize("spec", [None, 1.0, ["fixed"], b"fixed"])
def test_wrong_type(spec):
    with pytest.raises(TypeError):
        schedules.parse(spec)


def test_no_heavy_imports():
    # The file is loaded on its own: `gloro/__init__.py` may import keras.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('s', {schedules.__file__!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert not {'tensorflow', 'keras'} & set(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
