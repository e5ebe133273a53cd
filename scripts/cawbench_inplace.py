"""Run the ``cawbench`` command from a source checkout without installing it.

For machines where the package cannot be pip-installed (the lent GPU machine): ``methods/`` is mapped to
``cawbench.methods`` as the installed package does, and only the train/list/bench commands are loaded, so
optional dependencies of other commands (optuna, mlflow) are not needed.
usage: python scripts/cawbench_inplace.py bench ... | train ...   (or ``import cawbench_inplace; setup()``)
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup() -> None:
    """Make ``import cawbench`` and ``cawbench.methods`` resolve to this checkout."""
    sys.path.insert(0, str(ROOT))
    import cawbench

    if "cawbench.methods" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "cawbench.methods",
            ROOT / "methods" / "__init__.py",
            submodule_search_locations=[str(ROOT / "methods")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["cawbench.methods"] = module
        spec.loader.exec_module(module)
        cawbench.methods = module


if __name__ == "__main__":
    setup()
    from cawbench import cli

    cli.COMMAND_MODULES = ["cawbench.cli", "cawbench.bench"]
    sys.exit(cli.main())
