"""The import graph of `cascade_mega/` has no circles (imports inside functions count).

`tools/import_graph.py` builds the graph from every import statement; on the commit before the
redesign it found two circles (cli <-> slurm.submit through the sweep modules, and
inference.load <-> train.trainer <-> train.distill). Here: none now, and the check itself finds a
circle that goes through a function-level import.
"""

import importlib.util
import os

from helpers import ROOT


def _tool():
    spec = importlib.util.spec_from_file_location(
        "import_graph", os.path.join(ROOT, "tools", "import_graph.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_circles():
    graph = _tool()
    found = graph.circles(graph.edges(ROOT))
    assert found == [], found


def test_the_check_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "cascade_mega"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cascade_mega.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("def g():\n    import cascade_mega.a\n")
    (pkg / "d.py").write_text("from cascade_mega import a\n")  # points in, not round
    graph = _tool()
    assert graph.circles(graph.edges(str(tmp_path))) == [
        ["cascade_mega.a", "cascade_mega.c", "cascade_mega.sub.b"]]


def test_the_decoding_core_imports_only_itself():
    """The files an export copies (`convert/export.py: CORE`) import no other module of the
    project, at any level (kernels, too, come through the network: `Network.flex`)."""
    from cascade_mega.convert.export import CORE

    graph = _tool().edges(ROOT)
    outside = {m: sorted(set(graph.get(m, ())) - set(CORE)) for m in CORE}
    assert outside == {m: [] for m in CORE}
    for module in CORE:  # nor the kernel packages, which the graph of cascade_mega leaves out
        text = open(os.path.join(ROOT, *module.split(".")) + ".py").read()
        assert "cascade_kernels" not in text and "cascade_launchers" not in text, module


def test_checkpoints_sit_below_the_trainer():
    """`cascade_mega/checkpoint/` reaches no module of train/ (imports point down: the trainer
    and the commands that read checkpoints use it, not the reverse), nor any command."""
    graph = _tool().edges(ROOT)
    seen = set()
    todo = [m for m in graph if m == "cascade_mega.checkpoint" or
            m.startswith("cascade_mega.checkpoint.")]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    above = ("cascade_mega.train", "cascade_mega.inference", "cascade_mega.convert",
             "cascade_mega.evaluation", "cascade_mega.bench", "cascade_mega.cli")
    assert sorted(m for m in seen if m.startswith(above)) == []
