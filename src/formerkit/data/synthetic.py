"""Synthetic translation tasks the library generates itself: the embedded default of seq2seq training.

``synthetic:digits-to-words`` translates a number written in digits into English words
("412" -> "four hundred twelve"); ``synthetic:words-to-digits`` is the reverse. Numbers run
from 0 to 999,999. ``synthetic_pairs`` draws distinct numbers from a seeded generator (a digit
count from 1 to 6 uniformly, then a number with that many digits) and splits them, so the
held-out pairs never occur in training and the same seed always gives the same pairs.
"""

from __future__ import annotations

import random

from formerkit.data.pairs import ParallelData
from formerkit.errors import ConfigError, did_you_mean

PREFIX = "synthetic:"
TASKS = ("digits-to-words", "words-to-digits")
MAX_NUMBER = 999_999

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _below_thousand(n: int) -> list[str]:
    """Words of 1 <= n <= 999, e.g. 342 -> ["three", "hundred", "forty-two"]."""
    words = []
    hundreds, rest = divmod(n, 100)
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        tens, ones = divmod(rest, 10)
        words.append(_TENS[tens] + (f"-{_ONES[ones]}" if ones else ""))
    elif rest:
        words.append(_ONES[rest])
    return words


def number_to_words(n: int) -> str:
    """English words of 0 <= n <= 999,999, American style: 412005 -> "four hundred twelve thousand five"."""
    if not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ConfigError(f"number_to_words takes an integer in [0, {MAX_NUMBER}], got {n!r}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = [*_below_thousand(thousands), "thousand"] if thousands else []
    return " ".join(words + _below_thousand(rest))


def is_synthetic(spec: str | None) -> bool:
    """Whether a data source spec names a synthetic task (``synthetic:NAME``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def _distinct_numbers(count: int, rng: random.Random) -> list[int]:
    """``count`` distinct numbers in drawing order: a digit count 1..6 uniformly, then a number of that many digits."""
    seen: set[int] = set()
    numbers = []
    while len(numbers) < count:
        digits = rng.randint(1, 6)
        n = rng.randrange(0 if digits == 1 else 10 ** (digits - 1), 10**digits)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    return numbers


def synthetic_pairs(spec: str, *, size: int, val_fraction: float, seed: int) -> tuple[ParallelData, ParallelData]:
    """Generate the task ``spec`` (e.g. "synthetic:digits-to-words"): ``size`` pairs split into (train, held-out).

    The held-out split holds ``round(size * val_fraction)`` pairs (at least one); no number is
    in both splits. Deterministic in (spec, size, val_fraction, seed).
    """
    name = spec[len(PREFIX):] if is_synthetic(spec) else spec
    if name not in TASKS:
        raise ConfigError(f'unknown synthetic task "{spec}"{did_you_mean(name, TASKS)}; choose one of '
                          + ", ".join(PREFIX + t for t in TASKS))
    if not isinstance(size, int) or not 2 <= size <= (MAX_NUMBER + 1) // 2:
        raise ConfigError(f"data.synthetic_size must be an integer in [2, {(MAX_NUMBER + 1) // 2}], got {size!r}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(f"{name}:{seed}")
    numbers = _distinct_numbers(size, rng)
    rng.shuffle(numbers)
    n_val = min(max(1, round(size * val_fraction)), size - 1)
    digits = [[str(n) for n in part] for part in (numbers[n_val:], numbers[:n_val])]
    words = [[number_to_words(n) for n in part] for part in (numbers[n_val:], numbers[:n_val])]
    if name == "digits-to-words":
        return ParallelData(digits[0], words[0]), ParallelData(digits[1], words[1])
    return ParallelData(words[0], digits[0]), ParallelData(words[1], digits[1])
