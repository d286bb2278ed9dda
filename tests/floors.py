"""Float floors for the numerical tests: how far a result moves when only the order of float operations changes.

A tolerance in these tests is a multiple of such a floor, never a number read off one run:

* `thread_floor(fn)` runs the same computation with 1 and with 2 intra-op threads and returns how far the two
  results lie apart. The thread count changes the blocking and summation order of the reductions in the
  convolutions, matmuls and norms (and which kernel runs: PyTorch sends 1x1 convolutions of small batches to
  oneDNN only with more than one thread), which is exactly the kind of difference that separates two correct
  implementations of the same math. ../shared/reference/README.md measures its floors the same way (the
  original code, 1 thread instead of 2).
* `ulp_floor(x)` is float32's epsilon times a magnitude: the rounding of the last elementwise operations,
  a lower limit for results whose thread floor happens to be zero.

FACTOR is the multiple: ../shared/reference/README.md, "a different but correct operator order can cost a few
times the floor", tolerances "about 10x-100x the floor"; one step or one forward pass gets FACTOR x its floor.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-07
FACTOR = 10


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """n intra-op threads inside the block, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_threads(n: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with threads(n):
        return fn()


# ../shared/reference/README.md, "Tolerances (measured)": the original code redone with 1 intra-op thread
# instead of 2, max abs difference (the reference data's own floors)
FLOOR_FORWARD = 9.54e-07  # adm32 forward (outputs O(1)); also the floor of eps, the model output a step uses
FLOOR_STEP = 1.31e-06  # adm32 p10, one ancestral step replayed from its stored input, max over steps
FLOOR_P10_LOOP = 4.41e-06  # adm32 p10, whole ancestral loop, final sample
FLOOR_DDIM_LOOP = 1.6e-05  # adm32 ddim10, whole DDIM loop, final sample


def thread_floor(fn: Callable[[], torch.Tensor]) -> float:
    """max |fn() with 1 thread - fn() with 2 threads|: the float floor of the computation fn."""
    return (at_threads(1, fn).double() - at_threads(2, fn).double()).abs().max().item()


def ulp_floor(x: torch.Tensor) -> float:
    """float32 epsilon times the largest |x|: what rounding the final operations of x alone may cost."""
    return EPS32 * x.abs().max().item()


def tolerance(fn: Callable[[], torch.Tensor]) -> float:
    """An absolute tolerance for comparing fn() with another order of the same computation: FACTOR x its thread
    floor, at least FACTOR x its ulp floor (for computations whose reductions no thread count reorders)."""
    return FACTOR * max(thread_floor(fn), ulp_floor(at_threads(1, fn)))
