"""cascade_mega: block-diffusion language-model pretraining on megatron-core.

The top-level `kernels/` and `launchers/` folders are the packages `cascade_kernels` and
`cascade_launchers` (the one mapping: `[tool.setuptools.package-dir]` in pyproject.toml). An
installed project has them under those names. In a source tree (a checkout, or the copy a Slurm
job runs, `slurm/snapshot.py`: pyproject.toml beside this package) they are imported by those
names from the same tree as this package, whatever else is installed, so a process never mixes
two copies of the code.
"""

__version__ = "0.1.0"


def _import_names_from_this_tree() -> None:
    import importlib.abc
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    pyproject = os.path.join(root, "pyproject.toml")
    if not os.path.isfile(pyproject):
        return  # installed: the packages are where the installer put them
    import tomllib

    with open(pyproject, "rb") as f:
        mapping = tomllib.load(f).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    folders = {name: os.path.join(root, folder) for name, folder in mapping.items()
               if os.path.isfile(os.path.join(root, folder, "__init__.py"))}

    class TreeFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            folder = folders.get(fullname)
            if folder is None:
                return None
            return importlib.util.spec_from_file_location(
                fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])

    if folders and not any(type(f).__name__ == "TreeFinder" and getattr(f, "folders", None) ==
                           folders for f in sys.meta_path):
        finder = TreeFinder()
        finder.folders = folders
        sys.meta_path.insert(0, finder)


_import_names_from_this_tree()
