"""Compiles the route search to C with mypyc where it can; installs it as pure Python otherwise.

The planner's inner loop (`routing.search`, with the index and the receiving hours it reads on
every step) runs about a third faster compiled; the modules are the same typed Python either
way, and every test passes on both. Everything else about the package is in `pyproject.toml`.

Without a C compiler, or when the build fails for any reason, the install goes on with the
pure Python modules and says so. `COLDCHAIN_PURE_PYTHON=1` skips the compilation.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

COMPILED = ["routing/search.py", "routing/timetable.py", "routing/hours.py"]


def _pure(why: str) -> None:
    sys.stderr.write(f"coldchain: the route search is installed as pure Python ({why})\n")


class _OptionalBuildExt(build_ext):
    """A failed compilation leaves no compiled module behind: all of them or none."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure: install the pure modules instead
            _pure(f"compilation failed: {exc}")
            for ext in self.extensions:
                filename = self.get_ext_filename(ext.name)
                for path in (self.get_ext_fullpath(ext.name), filename):
                    if os.path.exists(path):
                        os.remove(path)


def _extensions() -> list[Any]:
    if os.environ.get("COLDCHAIN_PURE_PYTHON"):
        _pure("COLDCHAIN_PURE_PYTHON is set")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        _pure("mypyc is not installed")
        return []
    try:
        return list(mypycify(COMPILED, opt_level="3", group_name="coldchain_routing"))
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc exits on a type error
        _pure(f"mypyc refused the modules: {exc!r}")
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
