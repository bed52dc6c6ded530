"""Build kvcore: the Cython host core, plus the CUDA sources shipped as package data.

The kernels in ``cuda/`` are compiled at run time by CuPy (NVRTC), so the wheel only
carries their sources, copied into ``kvcore/_cuda/``. Keeping ``cuda/`` out of the
Python package tree avoids a top-level ``cuda`` package that would shadow NVIDIA's
``cuda`` namespace package.
"""

import os
import shutil
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent.resolve()
CUDA_SOURCES = HERE / "cuda"


class BuildPyWithKernels(build_py):
    """Copy ``cuda/*.cu`` and ``cuda/*.cuh`` into ``kvcore/_cuda/`` of the build."""

    def run(self):
        super().run()
        if self.editable_mode:
            return  # the editable package finds ../cuda next to itself
        target = Path(self.build_lib) / "kvcore" / "_cuda"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(CUDA_SOURCES.glob("*.cu*")):
            if source.suffix in (".cu", ".cuh"):
                shutil.copy2(source, target / source.name)


debug = os.environ.get("KVCORE_DEBUG_BUILD") == "1"
compile_args = ["-O0", "-g", "-fno-omit-frame-pointer"] if debug else ["-O3"]
link_args = []
if os.environ.get("KVCORE_ASAN") == "1":
    compile_args += ["-fsanitize=address"]
    link_args += ["-fsanitize=address"]

extensions = [
    Extension(
        name,
        [name.replace(".", "/") + ".pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    for name in (
        "kvcore._args", "kvcore._allocator", "kvcore._prefix", "kvcore._core",
        "kvcore._launch", "kvcore._step", "kvcore._swap",
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3"},
        annotate=False,
    ),
    cmdclass={"build_py": BuildPyWithKernels},
)
