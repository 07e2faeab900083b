"""fastcl's Triton kernels, installed as fastcl.kernels."""

if __name__ == "kernels":
    # Imported as the top-level `kernels`: the checkout's root is on sys.path (a REPL or
    # `python -m` started there). That name is Hugging Face's kernel package, which transformers
    # >= 5 imports; hand the name to it where it is installed, so that transformers still loads.
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    _root = Path(__file__).resolve().parent.parent
    _elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
