from selfdistill.models.backbone import Backbone, BackboneOutput, create_timm_model
from selfdistill.models.heads import DINOHead

__all__ = ["Backbone", "BackboneOutput", "DINOHead", "create_timm_model"]
