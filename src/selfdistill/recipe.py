"""Loading a pretraining recipe: a YAML file plus dotted overrides, its ``method`` section typed by
the method registry (so every method's own options are checked like the shared ones)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfdistill.config import Config, MethodConfig
from selfdistill.configkit import fail, read_recipe, root_from_tree
from selfdistill.methods import method_config_class

__all__ = ["config_from_dict", "load_config"]


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from nested plain data (a parsed recipe or ``Config.to_dict()``)."""
    method_tree = tree.get("method") or {}
    if not isinstance(method_tree, dict):
        fail("method", f"expected a mapping with at least 'name', got {method_tree!r}")
    method_cls = method_config_class(method_tree.get("name", MethodConfig.name))
    return root_from_tree(Config, tree, {"method": method_cls})


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: list[str] | None = None,
                sources: dict[str, str] | None = None) -> Config:
    """Read YAML recipes (stacked, each with its ``base``), apply dotted overrides, type-check and
    validate everything; ``sources`` receives where each key was set (``configkit.read_recipe``)."""
    return config_from_dict(read_recipe(path, overrides, sources))
