"""Building bnlab's C++ extension on first use, cached on disk.

The sources in ``cpu/`` are compiled with ``torch.utils.cpp_extension.load`` into
``~/.cache/bnlab/kernels/<key>`` (``BNLAB_CACHE_DIR`` moves it), where the key hashes the
sources, the flags, torch, Python and the CPU's instruction set: a new torch or a new
machine gets a new build, an unchanged one loads in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

SOURCE_DIR = Path(__file__).with_name("cpu")
SOURCES = ("forward.cpp", "backward.cpp", "pool.cpp", "ops.cpp")
HEADERS = ("kernels.h", "passes.h", "pool.h")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]  # -fopenmp: at::parallel_for


def _cpu_signature() -> str:
    """Identifies the instruction set the build targets (``-march=native``)."""
    try:
        return next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return platform.processor()


def build_key() -> str:
    """Cache key: the sources, the flags, torch (version and installation: ninja's build
    file names its headers, so two environments must not share a build), Python and the
    CPU's instruction set."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (" ".join(FLAGS), torch.__version__, str(Path(torch.__file__).parent), sys.version, _cpu_signature()):  # fmt: skip
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("BNLAB_CACHE_DIR") or Path.home() / ".cache" / "bnlab"
    return Path(root) / "kernels" / build_key()


def build() -> ModuleType:
    """Compile (or load the cached build of) the extension; raises if it cannot be built."""
    from torch.utils import cpp_extension

    try:
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = directory / "build.json"
    if not record.exists():
        print(
            f"bnlab: compiling the fused CPU kernels into {directory} (once per machine, about a minute)",
            file=sys.stderr,
            flush=True,
        )
    started = time.perf_counter()
    module = cpp_extension.load(
        name=f"bnlab_kernels_{build_key()}",
        sources=_sources_in(directory),
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],  # resolves to the libgomp torch has loaded (same SONAME)
        build_directory=str(directory),
        verbose=False,
    )
    if not record.exists():
        seconds = time.perf_counter() - started
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"compile_seconds": seconds, "flags": FLAGS}))
        os.replace(tmp, record)
    return module


def _sources_in(directory: Path) -> list[str]:
    """The sources, copied once into the build directory: every checkout of the same sources
    (worktrees, clones) then compiles the same paths, so ninja does not rebuild, in a cache
    they share, a library that other processes are loading (it keys on the command line)."""
    folder = directory / "src"
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix="src-", dir=directory))
        for name in (*SOURCES, *HEADERS):
            shutil.copy2(SOURCE_DIR / name, staging / name)
        try:
            os.replace(staging, folder)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return [str(folder / name) for name in SOURCES]


def compile_seconds() -> float | None:
    """How long the first (compiling) load took, as recorded in the cache."""
    try:
        return json.loads((cache_dir() / "build.json").read_text())["compile_seconds"]
    except (OSError, ValueError, KeyError):
        return None
