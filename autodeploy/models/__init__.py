"""Model ingestion: cards, tiny test models, the ModelFactory and the streaming checkpoint loader."""

from .factory import FACTORIES, ModelFactory, ModelResolutionError, create_factory, get_factory_class, register_factory
from .tiny import ensure_tiny_model

__all__ = [
    "FACTORIES",
    "ModelFactory",
    "ModelResolutionError",
    "create_factory",
    "ensure_tiny_model",
    "get_factory_class",
    "register_factory",
]
