"""torch.export of HF models into the pipeline's GraphModule, with a registry of export patches."""

from .export import ExportError, export_to_gm
from .patches import export_patches, register_patch

__all__ = ["ExportError", "export_patches", "export_to_gm", "register_patch"]
