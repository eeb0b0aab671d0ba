"""docs/configuration.md is what ``python -m cli.config_docs`` generates, and covers every setting."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from cli import config_docs

ROOT = Path(__file__).resolve().parents[2]


def _all_subclasses(cls: type[BaseSettings]) -> set[type[BaseSettings]]:
    found: set[type[BaseSettings]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def _import_every_module(package: str) -> None:
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


def test_configuration_md_is_current() -> None:
    on_disk = config_docs.DOC_PATH.read_text()
    assert on_disk == config_docs.render(), (
        "docs/configuration.md is out of date: run `python -m cli.config_docs` and commit the result"
    )


def test_every_settings_class_in_libs_and_services_is_documented() -> None:
    _import_every_module("libs")
    _import_every_module("services")
    ours = {
        cls
        for cls in _all_subclasses(BaseSettings)
        if cls.__module__.split(".")[0] in {"libs", "services"} and cls.model_fields
    }
    documented = set(config_docs.settings_classes())
    missing = sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in ours - documented)
    assert not missing, f"add their modules to cli.config_docs.SETTINGS_MODULES: {missing}"


def test_each_variable_is_documented_once() -> None:
    names = [
        row.env
        for cls in config_docs.settings_classes()
        for row in config_docs.variables(cls)  # only the fields a class declares itself
    ]
    assert len(names) == len(set(names))
    assert all(name.startswith("FLIGHTLOG_") for name in names)


def test_check_mode_fails_on_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "configuration.md"
    assert config_docs.main(["--check", "--output", str(target)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_docs.main(["--output", str(target)]) == 0
    assert config_docs.main(["--check", "--output", str(target)]) == 0
    assert target.read_text() == config_docs.render()


def test_defaults_do_not_depend_on_the_machine() -> None:
    text = config_docs.render()
    assert str(ROOT) not in text  # paths under the checkout are written <repository>/...
    assert "`<repository>/.state`" in text
    assert "`socket.gethostname()`" in text  # a default factory is named, not called
