"""Methods, one file each; importing this package registers every one of them.

A new method is a new file here with a ``@register_method("name")`` class: nothing else to edit. The file
declares its maths, recipes, report label and order, its BP twin recipes and any architecture plan only it
uses (see :class:`cawbench.method.Method`). Methods import no other method, only private shared modules
(``_channelwise``, ``_ff_common``).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
