"""argparse types for the benchmarks' numeric flags: a bad value is an argparse
error naming the flag (``argument --steps: must be an int >= 1, got '0'``)."""

from __future__ import annotations

import argparse


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an int >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


positive_int = _int_at_least(1)
at_least_two = _int_at_least(2)
non_negative_int = _int_at_least(0)
