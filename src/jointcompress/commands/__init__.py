"""CLI sub-commands; each module has `register(app)` that adds its command to the Typer app."""

# the built-in reference models (jointcompress.models.MODELS), named here so help texts need no torch import
BUILT_IN_MODELS = "lenet300 | lenet5 | resnet | mobilenet | seqcnn | vit | lstm"
# what --model takes: a built-in or the user's own zero-argument builder (models.load_builder)
MODEL_CHOICES = f"{BUILT_IN_MODELS}, or your builder (package.module:function or file.py:function)"
# --device of the commands that train (devices.resolve_device reads it)
DEVICE_HELP = ("Where to train: cpu, cuda, cuda:N, mps, or auto (a GPU where there is one). Artifacts, int8 models and "
               "latency are made and measured on the CPU either way.")


def refuse_hf_recipe(recipe, recipe_path, command: str, instead: str) -> None:
    """`command` trains image models (built-in or a builder); an hf: recipe reached its "no model
    given" message, which sent a text-classifier user looking for a `model:` that does not apply."""
    if recipe.hf is None and not (recipe.model or "").startswith("hf:"):
        return
    from ..errors import RecipeError

    raise RecipeError(f"{recipe_path}: an hf: recipe (a Hugging Face text classifier) is run by `jointcompress compress`; "
                      f"`{command}` trains the built-in image models or your own (--model). {instead}")
