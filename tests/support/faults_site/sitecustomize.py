"""Test only: Python imports this at start-up when this folder is on PYTHONPATH
(``tests.support.faults.fault_env``). With ``CROSSFLOW_FAULTS`` set, each fault it names is
installed right after its module is first imported (``tests/support/faults.py``)."""
import os

if os.environ.get("CROSSFLOW_FAULTS"):
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    class _PatchAfterImport(importlib.abc.MetaPathFinder):
        """Finds nothing itself: wraps the loader of a watched module to patch it once executed."""

        def __init__(self, faults):
            self.pending = {}
            for fault in faults:
                self.pending.setdefault(fault.module, []).append(fault)

        def find_spec(self, name, path, target=None):
            if name not in self.pending:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    faults, exec_module = self.pending.pop(name), spec.loader.exec_module

                    def exec_then_patch(module, faults=faults, exec_module=exec_module):
                        exec_module(module)
                        for fault in faults:
                            fault.patch(module)
                    spec.loader.exec_module = exec_then_patch
                    return spec
            return None

    # tests/support/faults.py by its path: nothing added to sys.path, no package named "tests" needed
    _spec = importlib.util.spec_from_file_location("crossflow_test_faults", Path(__file__).parents[1] / "faults.py")
    _faults = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _faults  # dataclasses look their module up while the file executes
    _spec.loader.exec_module(_faults)
    sys.meta_path.insert(0, _PatchAfterImport(_faults.faults_from_env(os.environ["CROSSFLOW_FAULTS"])))
