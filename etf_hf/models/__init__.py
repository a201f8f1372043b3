"""Model architectures shipped with etf_hf (for reproducing the paper), registered with the Auto classes."""
from .mlp import (CollapseMLPBlock, CollapseMLPConfig, MLPForImageClassification, CollapseMLPPreTrainedModel,
                  register_auto_classes)

__all__ = ["CollapseMLPBlock", "CollapseMLPConfig", "CollapseMLPPreTrainedModel", "MLPForImageClassification",
           "register_auto_classes"]
