"""Methods, registered by name. Adding a method = one module here plus a recipe in configs/."""

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
from selfdistill.methods import dino  # noqa: E402,F401  (registers "dino")

__all__ = [
    "Method", "ParamGroup", "Progress", "StepOutput", "build_method", "method_class",
    "method_config_class", "method_names", "register_method",
]
