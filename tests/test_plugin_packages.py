"""
The built-in plugins as packages: each imports only the public core, as a
third party's would; every package (and the redis store's Lua scripts) is
installed by a plain ``pip install``; the module paths of before the split
still give the same plugins.
"""

from __future__ import annotations

import ast
import configparser
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"

#: What a plugin may import of mailhub (DESIGN.md: the public core and the
#: helpers it offers plugin authors), besides ``mailhub.plugins`` itself.
PUBLIC_CORE = {
    "mailhub.interfaces",
    "mailhub.model",
    "mailhub.smtp.client",
    "mailhub.config",
    "mailhub.plugin",
}


def _core_imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` for each name ``path`` imports from mailhub."""
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mailhub":
                    found.append((node.lineno, alias.name, ""))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "mailhub":
                for alias in node.names:
                    found.append((node.lineno, node.module, alias.name))
    return found


def test_plugins_import_only_public_names_of_the_public_core() -> None:
    """No module in plugins/ imports a private name, or a module outside the public core."""
    wrong = []
    for path in sorted(PLUGINS.rglob("*.py")):
        for line, module, name in _core_imports(path):
            if module == "mailhub.smtp" and name == "client":
                module, name = "mailhub.smtp.client", ""
            own = module == "mailhub.plugins" or module.startswith("mailhub.plugins.")
            if not own and module not in PUBLIC_CORE:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}")
            elif name.startswith("_") or any(part.startswith("_") for part in module.split(".")):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {module}.{name}")
    assert wrong == []


def _setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def test_every_plugin_package_is_installed() -> None:
    """Each package under plugins/ is in setup.cfg's packages (a compat editable install hides a miss)."""
    listed = set(_setup_cfg()["options"]["packages"].split())
    packages = {
        "mailhub.plugins." + ".".join(init.parent.relative_to(PLUGINS).parts)
        for init in PLUGINS.rglob("__init__.py")
        if init.parent != PLUGINS
    }
    assert packages, "no plugin package found"
    assert packages - listed == set()


def test_the_redis_scripts_are_package_data() -> None:
    """The redis store's .lua files are installed with it, and each is one of its scripts."""
    patterns = _setup_cfg()["options.package_data"]["mailhub.plugins.redis"].replace(",", " ").split()
    lua = sorted((PLUGINS / "redis").glob("*.lua"))
    assert lua
    assert all(any(f.match(p) for p in patterns) for f in lua)
    from mailhub.plugins.redis import scripts

    texts = [v for k, v in vars(scripts).items() if k.isupper() and isinstance(v, str)]
    for f in lua:
        assert any(f.read_text() in text for text in texts), f"{f.name} is in no script"


@pytest.mark.parametrize(
    "old, new",
    [
        ("mailhub.plugins.smtp_transport", "mailhub.plugins.smtp"),
        ("mailhub.plugins.sqlite_store", "mailhub.plugins.sqlite"),
        ("mailhub.plugins.redis_store", "mailhub.plugins.redis"),
        ("mailhub.plugins.postgresql_archive", "mailhub.plugins.postgresql"),
        ("mailhub.plugins.sqlite_archive", "mailhub.plugins.sqlite.archive"),
    ],
)
def test_old_module_paths_give_the_same_plugin(old: str, new: str) -> None:
    """An install whose entry points name the old modules loads the same plugin objects."""
    before, after = importlib.import_module(old), importlib.import_module(new)
    assert before.plugin is after.plugin
    for name in before.__all__:
        assert getattr(before, name) is getattr(after, name)
