"""Typed configs: one dataclass per section, filled from YAML and `key.sub=value` overrides.

fields.py    a key's machinery: the range or registry it accepts, its help line (`setting`), `Section`'s checks
accepted.py  what values may be: the closed sets of names, the upper bounds (each with why), model.name's forms
schema.py    the sections (data, aug, model, optim, sched, train, dist, checkpoint, output) and `Config`
load.py      YAML + overrides -> a checked Config, every failure one line; a Config as a dict or YAML and back
keys.py      the keys of the schema: for the error messages, and one line per key for `--help`
registry.py  models, datasets, optimizers and schedules by name: the open sets the config accepts
"""

from fasttrain.config.accepted import (BATCH_MAX, CAPTURABLE_OPTIMIZERS, DATASET_SIDES, EPOCHS_MAX, HIDDEN_MAX,
                                       HOST_MEMORY_BUDGET, IMAGE_SIDE_MAX, LR_MAX, SEED_MAX, SPLIT_MAX, STEPS_MAX,
                                       SYNTHETIC_MAX, SYNTHETIC_PEAK_BYTES, TORCHVISION_PREFIX, WORKERS_PER_CPU,
                                       BackendName, BnBiasScope, CompileMode, LoaderName, LookaheadEnd, LossReduction,
                                       PaddingMode, PrecisionName, SignalName, TtaName, check_not_stdlib,
                                       model_names_accepted)
from fasttrain.config.fields import Choice, Range, Section
from fasttrain.config.keys import all_keys, describe_keys, valid_keys
from fasttrain.config.load import from_dict, load_config, to_dict, to_yaml
from fasttrain.config.registry import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, Registry
from fasttrain.config.schema import (AugConfig, CheckpointConfig, Config, DataConfig, DistConfig, ModelConfig,
                                     OptimConfig, OutputConfig, SchedConfig, TrainConfig)

__all__ = ["BATCH_MAX", "CAPTURABLE_OPTIMIZERS", "DATASETS", "DATASET_SIDES", "EPOCHS_MAX", "HIDDEN_MAX",
           "HOST_MEMORY_BUDGET", "IMAGE_SIDE_MAX", "LR_MAX", "MODELS", "OPTIMIZERS", "SCHEDULES", "SEED_MAX",
           "SPLIT_MAX", "STEPS_MAX", "SYNTHETIC_MAX", "SYNTHETIC_PEAK_BYTES", "TORCHVISION_PREFIX", "WORKERS_PER_CPU",
           "AugConfig", "BackendName", "BnBiasScope", "CheckpointConfig", "Choice", "CompileMode", "Config",
           "DataConfig", "DistConfig", "LoaderName", "LookaheadEnd", "LossReduction", "ModelConfig", "OptimConfig",
           "OutputConfig", "PaddingMode", "PrecisionName", "Range",
           "Registry", "SchedConfig", "Section", "SignalName", "TrainConfig", "TtaName", "all_keys",
           "check_not_stdlib", "describe_keys", "from_dict", "load_config", "model_names_accepted", "to_dict",
           "to_yaml", "valid_keys"]
