"""Methods, registered by name. Adding a method = one module in this package + a recipe in configs/:
every module here is imported on start-up, so its ``@register_method`` runs without other edits."""

import importlib
import pkgutil

from selfdistill.methods.base import (
    Method,
    ParamGroup,
    Progress,
    StepOutput,
    build_method,
    method_class,
    method_config_class,
    method_names,
    register_method,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method", "ParamGroup", "Progress", "StepOutput", "build_method", "method_class",
    "method_config_class", "method_names", "register_method",
]
