"""Loading a pretraining recipe: a YAML file plus dotted overrides, its ``method`` section typed by
the method registry (so every method's own options are checked like the shared ones)."""

from __future__ import annotations

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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply dotted overrides, type-check and validate everything."""
    return config_from_dict(read_recipe(path, overrides))
