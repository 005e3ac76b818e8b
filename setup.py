"""Optional mypyc build of the proxy's hot path; everything else is in pyproject.toml.

With ``MESHLAYER_MYPYC=1`` in the environment, ``pip install .`` / ``pip wheel .``
compile the modules below with mypyc (C extensions next to the .py files, which stay
in the package). Without it, or when mypyc or a C compiler is missing, or when any
module fails to build, the package is the pure-Python one, unchanged. Editable
installs (``pip install -e .``) put the extensions in ``src/``, where they shadow
the .py files: edit, then reinstall, or the edits are not what runs. ``make``
(demo, test, bench) does that for you: it compiles after installing the
dependencies (mypyc type-checks against them) and again whenever a source
changes, and stops if the build fell back to pure Python; ``make PURE=1 ...``
runs the sources without compiling.

``MESHLAYER_PGO=generate`` or ``use`` (with ``MESHLAYER_MYPYC=1``) builds the
extensions for GCC's profile-guided optimization: instrumented, writing their
profile under ``build/pgo`` as they run, then optimized with it. ``make`` does
both around a short training run of the request path (``bench/hotpath.py``).
Both passes compile in ``build/pgo`` (the profile is found by the object file's
path) and need the same generated C: the same sources and mypyc.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

HOT = [
    "codec/__init__.py",
    "codec/block.py",
    "codec/chunked.py",
    "codec/errors.py",
    "codec/events.py",
    "codec/fields.py",
    "codec/request.py",
    "codec/response.py",
    "codec/serialize.py",
    "exchange.py",
    "server.py",
    "upstream.py",
    "pool.py",
    "balancer.py",
    "resilience.py",
    "routes.py",
    "runtime.py",
    "metrics.py",
    "errors.py",
    "admission.py",
    "classes.py",
    "classify.py",
    "sidecar.py",
    "gateway.py",
    # subclasses server.DownstreamConnection: interpreted classes cannot inherit
    # from compiled ones, so it is compiled with them
    "acceptor.py",
]


def _warn(msg: str) -> None:
    print(f"meshlayer: {msg}; building pure Python", file=sys.stderr)


PGO = os.environ.get("MESHLAYER_PGO", "")
PGO_DIR = Path(__file__).resolve().parent / "build" / "pgo"


def pgo_flags(mode: str) -> tuple[list[str], list[str]]:
    """Compile and link flags for a PGO pass (``generate`` or ``use``)."""
    if mode == "generate":
        flag = f"-fprofile-generate={PGO_DIR}"
        return [flag, "-fprofile-update=single"], [flag]
    if mode == "use":
        # Code the training did not reach (errors, the inbound side, TLS ...) is
        # optimized as without a profile, not as cold.
        use = [f"-fprofile-use={PGO_DIR}", "-fprofile-partial-training"]
        # pip builds in a fresh environment each time, so mypyc's runtime sources
        # (included by the generated C) have moved between the passes: same code.
        quiet = ["-Wno-missing-profile", "-Wno-coverage-mismatch"]
        return [*use, "-fprofile-correction", *quiet], []
    raise SystemExit(f"MESHLAYER_PGO={mode!r}: expected generate or use")


class OptionalBuildExt(build_ext):
    """All of the mypyc extensions or none: a shim without its shared library
    would fail to import instead of falling back to the .py file."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if PGO and self.extensions:
            self.build_temp = str(PGO_DIR / "obj")  # the same object paths in both passes
            self.force = True
            cflags, ldflags = pgo_flags(PGO)
            for ext in self.extensions:
                if cflags[0] not in ext.extra_compile_args:  # finalized more than once
                    ext.extra_compile_args = [*ext.extra_compile_args, *cflags]
                    ext.extra_link_args = [*ext.extra_link_args, *ldflags]

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler, compile error, ...
            _warn(f"mypyc build failed ({exc})")
            for ext in self.extensions:
                for path in (self.get_ext_fullpath(ext.name), self._inplace_path(ext.name)):
                    Path(path).unlink(missing_ok=True)

    def _inplace_path(self, name: str) -> str:
        *pkg, mod = name.split(".")
        base = Path("src", *pkg) if pkg else Path("src")
        return str(base / Path(self.get_ext_filename(mod)).name)


COMPILE = os.environ.get("MESHLAYER_MYPYC", "0") == "1"
# The mypyc that compiles must match the C it generates: one pinned version. Under PEP 517
# setuptools hands setup_requires to pip, which installs it in the isolated build env.
MYPYC = "mypy==2.4.1"


def ext_modules() -> list[Any]:
    if not COMPILE:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # also pip's first pass, which only collects setup_requires
        _warn("mypyc is not importable")
        return []
    proxy = Path("src", "meshlayer", "proxy")
    try:
        return list(mypycify([str(proxy / p) for p in HOT], opt_level="3"))
    except (Exception, SystemExit) as exc:  # mypyc reports its errors and exits
        _warn(f"mypyc could not compile ({exc!r})")
        return []


def remove_stale() -> None:
    """Old extensions go before any build: in a pure build they would shadow the sources,
    in a compiled one an old group's shared library would linger."""
    proxy = Path("src", "meshlayer", "proxy")
    for p in HOT:
        for so in (proxy / p).parent.glob(Path(p).stem + ".*.so"):
            so.unlink()
    for so in Path("src").glob("*__mypyc.*.so"):
        so.unlink()


remove_stale()

setup(
    ext_modules=ext_modules(),
    cmdclass={"build_ext": OptionalBuildExt},
    setup_requires=[MYPYC] if COMPILE else [],
)
