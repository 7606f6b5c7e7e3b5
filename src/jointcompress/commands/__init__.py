"""CLI sub-commands; each module has `register(app)` that adds its command to the Typer app."""

# the built-in reference models (jointcompress.models.MODELS), named here so help texts need no torch import
BUILT_IN_MODELS = "lenet300 | lenet5 | resnet | seqcnn | vit | lstm"
