"""etf_hf: fix transformer feed-forward layers to simplex equiangular tight frames (arXiv 2412.00884).

Importing the package registers the ETF model types (``etf_gpt2``, ``etf_bert``, ...) with the
transformers Auto classes, so patched checkpoints load with ``AutoModelFor*.from_pretrained``.
"""
from .config import FORMAT_VERSION, ETFConfig
from .controls import CONTROL_BASES
from .etf import BASES, simplex_etf
from .layers import ETFLinear
from .modeling_etf import register_model_type, register_registry_architectures
from .models import CollapseMLPConfig, MLPForImageClassification, register_auto_classes
from .injection import etf_layers, parameter_summary
from .head import DotRegressionLoss, ETFClassifier, dot_regression_loss
from .placement import Placement, suggest_layers
from .patch import lock_blocks, materialize, patch, print_trainable_parameters, resolve
from .collapse import CollapseReport, collapse_report, plot_collapse
from .trainer_metrics import CollapseMetrics
from .adaptive import AdaptiveETFCallback

__version__ = "0.1.0"

register_auto_classes()  # before the next line, which derives etf_collapse_mlp from collapse_mlp's Auto entries
register_registry_architectures()

__all__ = [
    "AdaptiveETFCallback", "BASES", "CONTROL_BASES", "CollapseMLPConfig", "CollapseMetrics", "CollapseReport", "DotRegressionLoss", "ETFClassifier",
    "ETFConfig", "ETFLinear", "FORMAT_VERSION", "MLPForImageClassification", "Placement", "collapse_report",
    "dot_regression_loss", "etf_layers", "lock_blocks", "materialize", "parameter_summary", "patch", "plot_collapse",
    "print_trainable_parameters", "register_model_type", "resolve", "simplex_etf", "suggest_layers",
]
