"""ComfyUI glue, the only room that imports comfy: V3 node classes, the scheduler registration and the
route the frontend extension (web/) reads.

Each node module lists its classes in ``NODES``; a module that changes ComfyUI's global tables
(scheduler or sampler names, model folders, server routes) does it in a ``register()`` that is safe to
call again, because ComfyUI executes this package anew each time it loads the folder.
"""

from . import schedule_route, schedulers, shortcut, student

_NODE_MODULES = (schedulers, shortcut, student)

for _module in (*_NODE_MODULES, schedule_route):
    if hasattr(_module, "register"):
        _module.register()

NODES = [node for module in _NODE_MODULES for node in module.NODES]
_SCHEMAS = [node.GET_SCHEMA() for node in NODES]
NODE_CLASS_MAPPINGS = {schema.node_id: node for schema, node in zip(_SCHEMAS, NODES)}
NODE_DISPLAY_NAME_MAPPINGS = {schema.node_id: schema.display_name for schema in _SCHEMAS}
