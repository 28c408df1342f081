"""Value schedules written as strings.

A schedule maps training progress `t` in `[0, 1]` (the fraction of the whole
run, `(epoch + batch / steps_per_epoch) / epochs`) to a *multiplier* of some
base value, e.g. the target epsilon, a TRADES loss weight or the learning
rate. Schedules are written as short strings so that they can be passed on a
command line or stored in a config file.

Grammar:

```
schedule      := keyword | point ("-" [interpolation "-"] point)*
point         := "[" value "]" | "[" position "%" ":" value "]"
interpolation := "lin" | "log" | "cos"
keyword       := "fixed" | "linear" | "logarithmic" | "cosine"
```

- `value` is a non-negative float; scientific notation such as `1e-3` is
  accepted.
- `position` is a percentage of training in `[0, 100]`. The first point may
  omit its position (it is then at 0%) and the last point may omit its
  position (it is then at 100%); every other point must give one. A schedule
  made of a single point is at 0%.
- Positions must be non-decreasing. Two consecutive points at the same
  position express an instantaneous jump.
- Whitespace around tokens and inside the brackets is ignored. Keywords and
  interpolation names are case-sensitive.

Between two consecutive points `[p0%:v0]` and `[p1%:v1]`, with
`u = (t - p0) / (p1 - p0)`:

- `lin`: linear, `v0 + (v1 - v0) * u`.
- `log`: geometric, `v0 * (v1 / v0) ** u`; both values must be > 0.
- `cos`: half-cosine, `v1 + (v0 - v1) * (1 + cos(pi * u)) / 2`.
- nothing: the value holds at `v0` and jumps to `v1` at `p1`.

Before the first point's position the first value holds; from the last
point's position on the last value holds. At a jump the value on the right of
the jump is used (schedules are right-continuous).

Keywords:

- `"fixed"`: `[1.]`, a constant multiplier of 1.
- `"linear"`: `[0.]-lin-[50%:1.]`, a ramp over the first half, then hold.
- `"logarithmic"`: `[0.01]-log-[50%:1.]`, a geometric ramp over the first
  half, then hold.
- `"cosine"`: `[1.]-cos-[0.]`, a cosine decay over the whole run.

Example:

```python
from gloro import schedules

s = schedules.parse("[0.01]-log-[50%:1.1]")
s(0.0)    # 0.01
s(0.25)   # 0.01 * 110 ** 0.5
s(0.75)   # 1.1
schedules.parse("[1.]-[50%:1.]-cos-[0.001]")     # hold, then decay
schedules.parse("[0]-lin-[25%:1]-[75%:1]-lin-[0.1]")  # warm up, cool down
schedules.parse("[1]-[50%:0.1]")                 # step decay at mid-run
```

`ScheduledLearningRate` turns a schedule into a Keras learning-rate schedule
for an optimizer; `gloro.callbacks.EpsilonScheduler` and `TradesScheduler`
apply schedules to epsilon and the TRADES weight.
"""

import bisect
import dataclasses
import math
import re

import keras
from keras import ops

KEYWORDS = {
    "fixed": "[1.]",
    "linear": "[0.]-lin-[50%:1.]",
    "logarithmic": "[0.01]-log-[50%:1.]",
    "cosine": "[1.]-cos-[0.]",
}

_INTERPOLATIONS = {
    "lin": lambda v0, v1, u: v0 + (v1 - v0) * u,
    "log": lambda v0, v1, u: v0 * (v1 / v0) ** u,
    "cos": lambda v0, v1, u: v1 + (v0 - v1) * (1.0 + math.cos(math.pi * u)) / 2.0,
}

# Points are matched whole before anything else so that the `-` of an
# exponent such as `1e-3` is never mistaken for a separator.
_TOKEN = re.compile(
    r"(?P<point>\[[^\[\]]*\])|(?P<word>[A-Za-z_]\w*)|(?P<dash>-)"
    r"|(?P<space>\s+)|(?P<other>.)"
)
# Signs are accepted here so that a negative number is reported as negative
# rather than as malformed.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A parsed schedule: a function of training progress to a multiplier.

    Two schedules are equal when their spec strings are equal.

    Args:
        spec: The schedule string; see the module docstring for the grammar.

    Raises:
        TypeError: If `spec` is not a string.
        ValueError: If `spec` is malformed.

    Example:

    >>> s = Schedule("[0]-lin-[1]")
    >>> s(0.25)
    0.25
    """

    spec: str
    _positions: tuple = dataclasses.field(init=False, repr=False, compare=False)
    _values: tuple = dataclasses.field(init=False, repr=False, compare=False)
    _interpolations: tuple = dataclasses.field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self):
        if not isinstance(self.spec, str):
            raise TypeError(
                f"A schedule must be a string or a Schedule, got "
                f"{type(self.spec).__name__}: {self.spec!r}."
            )
        positions, values, interpolations = _parse(self.spec)
        # The dataclass is frozen; bypassing it is only valid while building.
        object.__setattr__(self, "_positions", positions)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_interpolations", interpolations)

    def __call__(self, t):
        """Returns the multiplier at training progress `t`.

        Args:
            t: Fraction of training done; clamped to `[0, 1]`.

        Returns:
            The multiplier, as a Python float.
        """
        t = min(max(float(t), 0.0), 1.0)
        # bisect_right skips over zero-width segments, so a jump resolves to
        # the value on its right and `p1 > p0` below.
        i = bisect.bisect_right(self._positions, t) - 1
        if i < 0:
            return self._values[0]
        if i >= len(self._values) - 1:
            return self._values[-1]
        kind = self._interpolations[i]
        v0, v1 = self._values[i], self._values[i + 1]
        if kind is None:
            return v0
        p0, p1 = self._positions[i], self._positions[i + 1]
        return float(_INTERPOLATIONS[kind](v0, v1, (t - p0) / (p1 - p0)))

    def at(self, epoch, batch, epochs, steps_per_epoch=None):
        """Returns the multiplier at a given point of training.

        Args:
            epoch: Index of the current epoch, from 0.
            batch: Index of the current batch within the epoch, from 0.
                Ignored when `steps_per_epoch` is None.
            epochs: Total number of epochs of the run.
            steps_per_epoch: Number of batches per epoch, or None to move the
                schedule once per epoch only.

        Returns:
            The multiplier, as a Python float.

        Example:

        >>> Schedule("[0]-lin-[1]").at(1, 5, epochs=2, steps_per_epoch=10)
        0.75
        """
        if epochs <= 0:
            raise ValueError(f"`epochs` must be positive, got {epochs}.")
        if steps_per_epoch is None:
            return self(epoch / epochs)
        return self((epoch + batch / steps_per_epoch) / epochs)

    def __str__(self):
        return self.spec


def parse(spec):
    """Parses a schedule string.

    Args:
        spec: A schedule string (see the module docstring for the grammar),
            or a `Schedule`, which is returned unchanged.

    Returns:
        A `Schedule`.

    Raises:
        TypeError: If `spec` is neither a string nor a `Schedule`.
        ValueError: If `spec` is malformed.

    Example:

    >>> s = parse("[0.01]-log-[50%:1.1]")
    >>> s(0.0), s(0.5)
    (0.01, 1.1)
    >>> parse(s) is s
    True
    """
    if isinstance(spec, Schedule):
        return spec
    return Schedule(spec)


def _parse(spec):
    """Returns `(positions, values, interpolations)` tuples for `spec`."""

    def fail(reason):
        return ValueError(f"Invalid schedule {spec!r}: {reason}.")

    tokens = []
    for m in _TOKEN.finditer(spec):
        kind = m.lastgroup
        if kind == "space":
            continue
        if kind == "other":
            char = m.group()
            if char in "[]":
                raise fail(f"unbalanced {char!r} at index {m.start()}")
            raise fail(f"unexpected character {char!r} at index {m.start()}")
        tokens.append((kind, m.group()))

    if not tokens:
        raise fail("empty schedule")
    if len(tokens) == 1 and tokens[0][0] == "word":
        word = tokens[0][1]
        if word not in KEYWORDS:
            raise fail(
                f"unknown keyword {word!r}, expected one of "
                f"{', '.join(map(repr, KEYWORDS))} or points like '[v]'"
            )
        return _parse(KEYWORDS[word])

    def take(expected, after):
        """Consumes the next token, which must be of kind `expected`."""
        nonlocal i
        if i == len(tokens):
            raise fail(f"trailing {after}")
        kind, text = tokens[i]
        if kind != expected:
            wanted = {
                "point": "a point like '[v]' or '[p%:v]'",
                "dash": "'-'",
            }[expected]
            raise fail(f"expected {wanted} after {after}, got {text!r}")
        i += 1
        return text

    i = 0
    points = [_parse_point(take("point", "the start"), fail)]
    interpolations = []
    while i < len(tokens):
        take("dash", "a point")
        interpolation = None
        if i < len(tokens) and tokens[i][0] == "word":
            interpolation = tokens[i][1]
            if interpolation not in _INTERPOLATIONS:
                raise fail(
                    f"unknown interpolation {interpolation!r}, expected one "
                    f"of {', '.join(map(repr, _INTERPOLATIONS))}"
                )
            i += 1
            take("dash", repr(interpolation))
        points.append(_parse_point(take("point", "'-'"), fail))
        interpolations.append(interpolation)

    positions = [p for p, _ in points]
    values = [v for _, v in points]
    if positions[0] is None:
        positions[0] = 0.0
    if len(positions) > 1 and positions[-1] is None:
        positions[-1] = 1.0
    for n, p in enumerate(positions):
        if p is None:
            raise fail(f"point {n + 1} needs a position, as in '[p%:v]'")
    for n in range(1, len(positions)):
        if positions[n] < positions[n - 1]:
            raise fail(
                f"positions must not decrease, but point {n + 1} is at "
                f"{positions[n] * 100:g}% after {positions[n - 1] * 100:g}%"
            )
    for n, kind in enumerate(interpolations):
        if kind == "log" and (values[n] <= 0 or values[n + 1] <= 0):
            raise fail(
                f"'log' needs values > 0, got {values[n]:g} and "
                f"{values[n + 1]:g}"
            )
    return tuple(positions), tuple(values), tuple(interpolations)


def _parse_point(text, fail):
    """Returns `(position or None, value)` for a point token like `[50%:1]`."""
    parts = text[1:-1].split(":")
    if len(parts) > 2:
        raise fail(f"point {text!r} has more than one ':'")
    value = _parse_number(parts[-1].strip(), "value", text, fail)
    if len(parts) == 1:
        return None, value
    position = parts[0].strip()
    if not position.endswith("%"):
        raise fail(f"position in {text!r} must be a percentage like '50%'")
    position = _parse_number(position[:-1].strip(), "position", text, fail)
    if position > 100:
        raise fail(f"position in {text!r} is over 100%")
    return position / 100, value


def _parse_number(text, what, point, fail):
    if not _NUMBER.fullmatch(text):
        raise fail(f"bad number {text!r} as {what} in {point!r}")
    number = float(text)
    if not math.isfinite(number):
        raise fail(f"{what} {text!r} in {point!r} is too large")
    if number < 0:
        raise fail(f"negative {what} in {point!r}")
    return number


def _evaluate(schedule, t):
    """`schedule(t)` for a float32 tensor `t` in `[0, 1]`, with `keras.ops`.

    Each point's segment is evaluated everywhere and the last point at or
    before `t` wins, which is `Schedule.__call__`'s right-continuous rule
    written without branching on tensors.
    """
    positions, values = schedule._positions, schedule._values
    value = ops.full_like(t, values[0])
    for i, p0 in enumerate(positions):
        if i == len(values) - 1:
            segment = ops.full_like(t, values[-1])
        else:
            p1, kind = positions[i + 1], schedule._interpolations[i]
            if p1 == p0:
                # A jump: the next point takes over at the same position.
                continue
            v0, v1 = values[i], values[i + 1]
            # Clipped so that segments not selected stay finite.
            u = ops.clip((t - p0) / (p1 - p0), 0.0, 1.0)
            if kind is None:
                segment = ops.full_like(t, v0)
            elif kind == "lin":
                segment = v0 + (v1 - v0) * u
            elif kind == "log":
                segment = v0 * ops.exp(u * math.log(v1 / v0))
            else:
                # (1 + cos(pi u)) / 2 written as a square: no cancellation
                # near the end of a decay, where float32 would lose digits.
                segment = v1 + (v0 - v1) * ops.square(ops.cos(math.pi / 2.0 * u))
        value = ops.where(t >= p0, segment, value)
    return value


@keras.saving.register_keras_serializable(package="gloro")
class ScheduledLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate following a schedule string, for any Keras optimizer.

    At optimizer step `step` the learning rate is
    `initial_learning_rate * schedule(min(step / total_steps, 1))`. It is
    computed with `keras.ops` from the optimizer's step counter, so it runs
    inside the compiled training step on every backend and is saved with the
    optimizer.

    Args:
        schedule: a schedule string (see this module's grammar) or a
            `Schedule`, e.g. `"[1.]-[50%:1.]-cos-[0.001]"`.
        initial_learning_rate: the base learning rate, a finite number >= 0.
        total_steps: the number of optimizer steps of the whole run (epochs
            times steps per epoch), a positive int.

    Raises:
        TypeError, ValueError: a malformed schedule or argument.

    Example:

    ```python
    lr = gloro.schedules.ScheduledLearningRate(
        "[1.]-[50%:1.]-cos-[0.001]", 1e-3, total_steps=epochs * steps_per_epoch)
    g.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_crossentropy")
    ```
    """

    def __init__(self, schedule, initial_learning_rate, total_steps):
        self.schedule = parse(schedule)
        if (
            isinstance(initial_learning_rate, bool)
            or not isinstance(initial_learning_rate, (int, float))
            or not math.isfinite(initial_learning_rate)
            or initial_learning_rate < 0
        ):
            raise ValueError(
                "initial_learning_rate must be a finite number >= 0, got "
                f"{initial_learning_rate!r}."
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.total_steps = total_steps

    def __call__(self, step):
        """Returns the learning rate at optimizer step `step`.

        Args:
            step: the optimizer's step counter, a scalar integer tensor.

        Returns:
            float32 scalar tensor.
        """
        t = ops.clip(ops.cast(step, "float32") / self.total_steps, 0.0, 1.0)
        return self.initial_learning_rate * _evaluate(self.schedule, t)

    def get_config(self):
        return {
            "schedule": self.schedule.spec,
            "initial_learning_rate": self.initial_learning_rate,
            "total_steps": self.total_steps,
        }
