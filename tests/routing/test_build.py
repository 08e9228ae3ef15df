"""The route search that runs is the one in the source tree: compiled from it, or the source.

`setup.py` compiles `routing.search`, `routing.timetable` and `routing.hours` with mypyc when it
can. A compiled module is imported ahead of its source, so after an edit the old build would
keep running until the next `pip install -e .`; the first test says so instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import pytest

from routing import hours, search, timetable

_MODULES: tuple[ModuleType, ...] = (search, timetable, hours)


def _built(module: ModuleType) -> Path:
    assert module.__file__ is not None
    return Path(module.__file__)


def test_a_compiled_module_is_not_older_than_its_source() -> None:
    for module in _MODULES:
        built = _built(module)
        if built.suffix == ".py":
            continue
        source = built.with_name(module.__name__.rpartition(".")[2] + ".py")
        assert built.stat().st_mtime >= source.stat().st_mtime, (
            f"{built.name} was compiled before {source.name} last changed: "
            "run `.venv/bin/pip install -e .` again to rebuild it"
        )


def test_the_modules_are_compiled_all_together_or_not_at_all() -> None:
    kinds = {module.__name__: _built(module).suffix == ".py" for module in _MODULES}
    assert len(set(kinds.values())) == 1, kinds
    assert search.COMPILED is not kinds["routing.search"]


def test_ci_runs_the_compiled_search() -> None:
    """This machine has a C compiler, so the install CI makes must compile the search (the
    benchmark figures are of the compiled one)."""
    if os.environ.get("CI") != "true":
        pytest.skip("only under CI: elsewhere a pure Python install is allowed")
    assert search.COMPILED, "setup.py did not compile routing.search: see the install's output"
