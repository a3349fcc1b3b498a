"""Every package directory is listed in pyproject.toml (the list is explicit for kernels/)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_all_packages_listed():
    listed = set(tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
                 ["tool"]["setuptools"]["packages"])
    found = {"cascade_kernels", "cascade_launchers"}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "cascade_mega")):
        if "__init__.py" in files:
            found.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert found == listed
