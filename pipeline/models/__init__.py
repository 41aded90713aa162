"""Models: STN + AlexNet + L-Softmax, its ablations and baselines, built by variant name."""

from pipeline.models.build import (
    INPUT_MEAN,
    INPUT_STD,
    MIN_INPUT_SIZE,
    VARIANTS,
    AuroraNet,
    build_model,
    load_init_weights,
    model_input_params,
    resize_frames,
    sky_level,
    to_model_input,
)
from pipeline.models.lsoftmax import DEFAULT_SCHEDULE, LambdaSchedule, LSoftmaxLinear
from pipeline.models.stn import SpatialTransformer

__all__ = [
    "DEFAULT_SCHEDULE",
    "INPUT_MEAN",
    "INPUT_STD",
    "MIN_INPUT_SIZE",
    "VARIANTS",
    "AuroraNet",
    "LSoftmaxLinear",
    "LambdaSchedule",
    "SpatialTransformer",
    "build_model",
    "load_init_weights",
    "model_input_params",
    "resize_frames",
    "sky_level",
    "to_model_input",
]
