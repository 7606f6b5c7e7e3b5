"""The compression session: techniques of a recipe driven from any training loop."""
from .outputs import Batch, call_model, logits_of, split_batch
from .prepare import prepare
from .session import CompressionSession
from .teacher import TeacherCache

__all__ = ["prepare", "CompressionSession", "Batch", "split_batch", "call_model", "logits_of", "TeacherCache"]
