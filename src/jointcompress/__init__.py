"""jointcompress: joint pruning + quantization + distillation for PyTorch models.

The public API is a handful of verbs:

    result = compress(model, recipe, train_data, evaluate, teacher=None)   # the built-in loop
    session = prepare(model, recipe, total_steps=N, teacher=None)         # your own loop
    spec = finalize(result.model, result.example_inputs)   # permanent, physically smaller
    progressive(teacher, student, recipe, train_data, evaluate)  # prune the teacher, then distil
    load_recipe("recipe.yaml")
"""
from .api import Result, compress, train_baseline
from .errors import ArtifactError, DataError, JointCompressError, RecipeError, TrainingError
from .finalize import finalize
from .progressive import progressive
from .recipe import Recipe, load_recipe, parse_recipe
from .session import CompressionSession, prepare

__version__ = "0.1.0"

__all__ = [
    "compress",
    "prepare",
    "CompressionSession",
    "finalize",
    "progressive",
    "load_recipe",
    "parse_recipe",
    "train_baseline",
    "Recipe",
    "Result",
    "JointCompressError",
    "RecipeError",
    "ArtifactError",
    "DataError",
    "TrainingError",
]
