"""A restricted unpickler for NAVSIM/OpenScene logs (the only pickle we read).

NAVSIM ships its logs as pickled lists of frame dicts holding builtin scalars
and containers plus numpy arrays. A plain ``pickle.load`` would run any
callable a tampered file names, so :class:`SafeUnpickler` resolves only the
globals needed to rebuild those values: builtin containers/scalars, numpy
array/dtype/scalar reconstruction (numpy 1 ``numpy.core`` and numpy 2
``numpy._core`` names), and ``_codecs.encode`` which protocol-2 pickles use
to carry raw array bytes. Anything else raises :class:`pickle.UnpicklingError`
naming the file and the refused global.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
from pathlib import Path
from typing import Any

# (module, name) pairs that may be resolved. Everything here only builds data.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            ("builtins", n)
            for n in (
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "int",
                "float",
                "complex",
                "bool",
                "str",
                "bytes",
                "bytearray",
                "slice",
                "range",
            )
        ),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # protocol <= 2 stores array bytes as latin-1 text
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        *(
            (mod, n)
            for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
            for n in ("_reconstruct", "scalar")
        ),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS`."""

    def __init__(self, file: Any, source: str = "<stream>") -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 era names (``__builtin__.set`` in protocol <= 2), mapped as pickle itself does.
        if module in _compat_pickle.IMPORT_MAPPING or (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) not in ALLOWED_GLOBALS and not _is_numpy_dtype_class(module, name):
            raise pickle.UnpicklingError(
                f"{self.source}: refused to load global {module}.{name} "
                "(only builtin containers/scalars and numpy arrays are allowed in NAVSIM logs)"
            )
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self.source}: persistent ids are not allowed ({pid!r})")


def _is_numpy_dtype_class(module: str, name: str) -> bool:
    """numpy >= 1.25 pickles dtypes as ``numpy.dtypes.Float64DType`` and friends: data only."""
    return (
        module == "numpy.dtypes"
        and name.endswith("DType")
        and name.isidentifier()
        and not name.startswith("_")
    )


def _resolve(module: str, name: str) -> Any:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        # numpy 2 pickles name numpy._core; numpy 1 provides the same objects in numpy.core.
        if not module.startswith("numpy._core"):
            raise
        mod = importlib.import_module(module.replace("numpy._core", "numpy.core", 1))
    return getattr(mod, name)


def safe_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`."""
    return SafeUnpickler(io.BytesIO(data), source).load()


def safe_load(path: str | Path) -> Any:
    """Unpickle the file at ``path`` with :class:`SafeUnpickler`; errors name the file."""
    from pipelines.io.fs import as_path  # local path or s3:// / gs:// URL

    path = as_path(path)
    with path.open("rb") as fh:
        try:
            return SafeUnpickler(fh, str(path)).load()
        except pickle.UnpicklingError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise pickle.UnpicklingError(f"{path}: corrupt or truncated pickle ({exc})") from None
        except (
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            ImportError,
            IndexError,
            KeyError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise pickle.UnpicklingError(
                f"{path}: corrupt or truncated pickle ({type(exc).__name__}: {exc})"
            ) from None
