"""jointcompress: joint pruning + quantization + distillation for PyTorch models.

The public API is a handful of verbs:

    result = compress(model, recipe, train_data, evaluate, teacher=None)   # the built-in loop
    session = prepare(model, recipe, total_steps=N, teacher=None)         # your own loop
    spec = finalize(result.model, result.example_inputs)   # permanent, physically smaller
    progressive(teacher, student, recipe, train_data, evaluate)  # prune the teacher, then distil
    load_recipe("recipe.yaml")
"""
import os as _os
import sys as _sys


def _quiet_interrupt_while_importing() -> None:
    """Run as the `jointcompress` command, Ctrl-C in its first seconds (torch and the package importing, before
    the command's own handling starts in cli.main) printed a KeyboardInterrupt traceback from deep inside torch's
    imports: said in one line instead, as the command says it later, exit status 130 as for any interrupted command. cli.main puts Python's
    own handler back. Imported as a library, nothing changes."""
    import signal

    if _os.path.basename(_sys.argv[0] if _sys.argv else "") != "jointcompress" \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:  # ignored (a background job): left so
        return

    def interrupted(signum, frame):
        _sys.stdout.write("interrupted\n")  # as cli._run says it once the command runs
        _sys.stdout.flush()
        _os._exit(130)  # no cleanup to run: nothing started, and half-imported modules can raise anew on exit

    interrupted.while_importing = True  # how cli.main knows it (and leaves any other handler alone)
    try:
        signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread: its owner handles signals
        pass


_quiet_interrupt_while_importing()

from .api import Result, compress, train_baseline  # noqa: E402 - after the interrupt handler, on purpose
from .errors import ArtifactError, DataError, JointCompressError, RecipeError, TrainingError  # noqa: E402
from .finalize import finalize  # noqa: E402
from .progressive import progressive  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from .session import CompressionSession, prepare  # noqa: E402

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
