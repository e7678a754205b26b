"""Direct Distill: few-step sampling for Stable-Diffusion-class models, for ComfyUI and diffusers.

As a ComfyUI custom-node folder this file is the entry point; as the pip package ``direct_distill``
it imports nothing heavy, so a plain diffusers environment never needs ComfyUI.
"""

import sys

# ComfyUI has always imported comfy before it loads custom nodes; testing sys.modules rather than
# importability keeps a diffusers script that merely has ComfyUI on its path from starting ComfyUI's
# device management (or failing on an older ComfyUI).
if "comfy" in sys.modules:
    # V3 node classes, exported as NODE_CLASS_MAPPINGS: ComfyUI reads that before comfy_entrypoint, and runs V3 classes.
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"  # the frontend extension: the live schedule plot on sampler and scheduler nodes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
