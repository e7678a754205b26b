"""diffusers glue: the shortcut as a ``callback_on_step_end``."""

from .shortcut import ShortcutCallback

__all__ = ["ShortcutCallback"]
