"""The curated public API: ``banyan_bus.__all__`` is exactly what ``__init__`` exports."""

from __future__ import annotations

import banyan_bus
from banyan_bus import errors


def test_all_is_exact_and_sorted() -> None:
    exported = {name for name in vars(banyan_bus) if not name.startswith("_")}
    modules = {name for name in exported if type(getattr(banyan_bus, name)).__name__ == "module"}
    assert set(banyan_bus.__all__) == exported - modules
    assert banyan_bus.__all__ == sorted(banyan_bus.__all__)


def test_every_error_has_one_root_and_is_exported() -> None:
    classes = [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
    ]
    assert all(issubclass(cls, errors.BanyanError) for cls in classes)
    assert {cls.__name__ for cls in classes} <= set(banyan_bus.__all__)
    for cls in classes:  # the tree in the module docstring names every class
        assert cls.__name__ in (errors.__doc__ or ""), cls.__name__
