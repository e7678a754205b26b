"""Networks and file formats of Direct Distill: torch and safetensors only."""

from .io import FileFormatError, atomic_save_file, read_safetensors

__all__ = ["FileFormatError", "atomic_save_file", "read_safetensors"]
__all__ += ["TimeEmbedNAFNet", "TwoStageShortcut", "load_shortcut", "save_shortcut"]

_LAZY = {"TimeEmbedNAFNet": ".nafnet", "TwoStageShortcut": ".nafnet",
         "load_shortcut": ".shortcut_file", "save_shortcut": ".shortcut_file"}


def __getattr__(name):
    # Imported on first use, so that `python -m direct_distill.models.nafnet` (its CLI) runs
    # without runpy warning that the package had already imported it.
    if name in _LAZY:
        from importlib import import_module
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
