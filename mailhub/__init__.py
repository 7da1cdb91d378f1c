"""mailhub: a store-and-forward mail continuity hub (see DESIGN.md)."""

__version__ = "0.1.0"


def _plugins_of_a_checkout() -> None:
    """
    Installed, ``plugins/`` becomes ``mailhub.plugins`` (setup.cfg's
    ``package_dir``).  Run from a source checkout (the README's compat
    editable install puts the repository root on ``sys.path``, which twistd
    needs to find ``twisted/plugins/``), nothing maps it: register exactly
    that directory as the package ``mailhub.plugins``, so both ways load
    the same built-in plugins and nothing else of the checkout becomes part
    of ``mailhub``.
    """
    import importlib.util
    import os
    import sys

    here = os.path.dirname(__file__)
    init = os.path.join(os.path.dirname(here), "plugins", "__init__.py")
    if "mailhub.plugins" in sys.modules or os.path.isdir(os.path.join(here, "plugins")):
        return
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "mailhub.plugins", init, submodule_search_locations=[os.path.dirname(init)]
    )
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["mailhub.plugins"] = module
    spec.loader.exec_module(module)
    globals()["plugins"] = module


_plugins_of_a_checkout()
