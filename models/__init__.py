"""Networks only: no Ray, no MLflow, no readers. See ``models/composer.py``."""

from models.composer import ComposerModel, random_conditions, random_inputs
from models.conditioning import CONDITIONS, Conditions, EncodedConditions
from models.dropout import ConditionDropout, DropoutConfig
from models.presets import PRESETS, build_model, preset_config

__all__ = [
    "CONDITIONS",
    "PRESETS",
    "ComposerModel",
    "ConditionDropout",
    "Conditions",
    "DropoutConfig",
    "EncodedConditions",
    "build_model",
    "preset_config",
    "random_conditions",
    "random_inputs",
]
