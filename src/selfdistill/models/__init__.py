"""The networks: timm backbones seen as self-supervised encoders, DINO heads, frozen teachers, and
the weights door with its formats (the vendors' registered on import, below)."""

from selfdistill.models import converters  # noqa: F401  (registers the vendor weight formats)
from selfdistill.models.backbone import Backbone, BackboneOutput, ModelConfig, export_backbone, load_backbone
from selfdistill.models.heads import DINOHead
from selfdistill.models.networks import create_timm_model

__all__ = ["Backbone", "BackboneOutput", "DINOHead", "ModelConfig", "create_timm_model", "export_backbone",
           "load_backbone"]
