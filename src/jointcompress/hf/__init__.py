"""Hugging Face transformers support: load, prune heads/FFN/layers, distil, int8, export.

Importing this package registers the pruned model classes (model_type "jointcompress_<type>" for
bert, distilbert, roberta, electra and deberta-v2: hf.modeling_pruned.PRUNED_CLASSES) with the
transformers Auto classes, so `AutoModelForSequenceClassification.from_pretrained` and `pipeline()`
load pruned folders without trust_remote_code.
"""

from jointcompress.hf import modeling_pruned

modeling_pruned.register()
