"""Training and demo data: procedural scenes, class-labelled image folders, bundled real photos."""

from .folder import ImageFolderData
from .scenes import (
    CLASS_NAMES,
    NUM_CLASSES,
    Batch,
    CropBatch,
    SceneParams,
    class_names,
    paired_crops,
    render,
    render_batch,
    render_region,
    sample_params,
    scene_batches,
    to_model_space,
)
from .wild import WILD_PHOTO_NAMES, center_crop, downscale, fit_square, wild_photo, wild_photos

__all__ = [
    "CLASS_NAMES",
    "NUM_CLASSES",
    "Batch",
    "CropBatch",
    "ImageFolderData",
    "SceneParams",
    "WILD_PHOTO_NAMES",
    "center_crop",
    "class_names",
    "downscale",
    "fit_square",
    "paired_crops",
    "render",
    "render_batch",
    "render_region",
    "sample_params",
    "scene_batches",
    "to_model_space",
    "wild_photo",
    "wild_photos",
]
