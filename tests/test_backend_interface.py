"""Both backends provide exactly the interface of kvcore.backends.base.Backend, so the
facade needs no branch on which one it holds (the CUDA backend is checked by reading
its source: CI has no CuPy)."""

import ast
import inspect
from pathlib import Path

from kvcore import KVCache, KVCacheConfig
from kvcore.backends.base import Backend
from kvcore.backends.numpy_ref import NumpyBackend

CFG = KVCacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, num_pages=8)


def protocol_members():
    methods = {name for name, value in vars(Backend).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    attributes = set(Backend.__annotations__)
    return methods, attributes


def test_numpy_backend_is_a_backend():
    backend = KVCache(CFG, device="cpu").backend
    assert isinstance(backend, NumpyBackend) and isinstance(backend, Backend)
    methods, attributes = protocol_members()
    for name in methods:
        assert callable(getattr(backend, name)), name
    for name in attributes:
        assert hasattr(backend, name), name


def test_cuda_backend_defines_every_member():
    source = Path(__file__).resolve().parent.parent / "kvcore" / "backends" / "cuda_backend.py"
    tree = ast.parse(source.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CudaBackend"]
    defined = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    targets = [t for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets]
    targets += [e for t in targets if isinstance(t, ast.Tuple) for e in t.elts]
    assigned = {t.attr for t in targets
                if isinstance(t, ast.Attribute) and getattr(t.value, "id", "") == "self"}
    assigned |= {t.id for n in cls.body if isinstance(n, ast.Assign) for t in n.targets
                 if isinstance(t, ast.Name)}
    methods, attributes = protocol_members()
    missing = (methods - defined - assigned) | (attributes - assigned)
    assert not missing, f"CudaBackend lacks {sorted(missing)}"


def test_the_facade_never_names_a_backend_class():
    source = (Path(__file__).resolve().parent.parent / "kvcore" / "cache.py").read_text()
    for name in ("NumpyBackend", "CudaBackend", "isinstance(self.backend"):
        assert name not in source
