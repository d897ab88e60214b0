"""A stage as a Ray/Beam worker receives it, without loading pickled bytes in the tests.

The driver pickles a stage (``__reduce_ex__`` -> ``__getstate__``); the worker
rebuilds it (``__setstate__``). ``copy.deepcopy`` goes through the same
``__reduce_ex__``/``__getstate__``/``__setstate__`` path, so the rebuilt object
is what a worker gets, and ``pickle.dumps`` proves the stage can be shipped.
"""

from __future__ import annotations

import copy
import pickle
from typing import TypeVar

T = TypeVar("T")


def shipped(obj: T) -> T:
    """``obj`` serialised as the driver ships it, and rebuilt as a worker rebuilds it."""
    assert pickle.dumps(obj), "not picklable: Ray/Beam could not ship it"
    return copy.deepcopy(obj)
