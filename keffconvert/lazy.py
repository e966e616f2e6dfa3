"""Names a package offers but loads only when first used: importing the package stays cheap (no
Keras or TensorFlow for the command line's start), and its modules never import each other through it."""

import importlib


def lazy_names(package, homes):
    """(`__getattr__`, `__dir__`) for module `package` whose names live in `homes` {name: module}."""

    def __getattr__(name):
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__():
        return sorted(set(vars(importlib.import_module(package))) | set(homes))

    return __getattr__, __dir__
