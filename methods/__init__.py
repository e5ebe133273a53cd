"""Methods, one file each; importing this package registers every one of them.

A new method is a new file here with a ``@register_method("name")`` class: nothing else to edit.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
