"""Timing for the benchmarks: variants called round-robin, so a shared machine's noise falls on all of them."""

import statistics
import time
from collections.abc import Callable


def interleaved(variants: dict[str, Callable[[], object]], *, rounds: int, calls: int) -> dict[str, float]:
  """Median seconds per call of each variant, timed round-robin after one warm-up round."""
  samples = {name: [] for name in variants}
  for round_ in range(rounds + 1):
    for name, call in variants.items():
      start = time.perf_counter()
      for _ in range(calls):
        call()
      if round_:  # round 0 warms up
        samples[name].append((time.perf_counter() - start) / calls)
  return {name: statistics.median(times) for name, times in samples.items()}
