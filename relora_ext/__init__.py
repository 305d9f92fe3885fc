"""relora_ext: ReLoRA* training for PyTorch with native C kernels.

Importing the package loads ``relora_ext._C``, which registers the ``torch.ops.relora`` operators;
``relora_ext.ops`` wraps them with argument checks. The training API builds on those ops:
the layers (``LoRALinear`` in lora.py, ``SSTLinear`` in sst.py, on the bases of adapter.py), the model
surgery (``ReLoRAConfig``/``wrap``/``unwrap`` in model.py), ``ReLoRAOptimizer`` (optim.py), the cycle it runs,
all or nothing (cycle.py), ``JaggedCosineLR`` (schedule.py), checkpoints, one file or sharded (checkpoint.py),
and the update-spectrum / training-stats helpers (analysis.py). Argument checks live in _checks.py;
multi-process support (DDP consistency checks, FSDP2 shard-wise merge and prune) in distributed.py.
"""

import torch  # noqa: F401  (loads libtorch before _C links against it)

from . import _C  # noqa: F401  (registers torch.ops.relora.*)

# The C kernels are built for several instruction-set levels; the first use picks one from the CPU's
# features, or the lower one RELORA_CPU_CAPABILITY names. Pick it now, at import (a level the CPU lacks is
# refused with a message on stderr, and the best one runs).
_C._cpu_capability()


def cpu_capability() -> str:
    """The instruction-set level the CPU kernels run: ``"default"``, ``"avx2"``, ``"avx512"`` or
    ``"avx512_bf16"`` (only ``"default"`` off x86-64).

    The highest level the CPU supports, unless the environment variable ``RELORA_CPU_CAPABILITY``
    (read at import) names a lower one, as PyTorch's ``ATEN_CPU_CAPABILITY`` does for ATen.

    Example::

        >>> import relora_ext
        >>> relora_ext.cpu_capability() in ("default", "avx2", "avx512", "avx512_bf16")
        True
    """
    return _C._cpu_capability()


from . import ops
from .analysis import TrainingStats, UpdateTracker, effective_rank, optimizer_state_bytes, update_spectrum
from .checkpoint import (atomic_save, load_adapters, load_checkpoint, load_sharded, save_adapters, save_checkpoint,
                         save_sharded)
from ._checks import CycleRefused
from .embedding import LoRAEmbedding
from .lora import LoRALinear
from .memory import memory_report
from .model import ReLoRAConfig, lora_layers, merged_state_dict, print_trainable_parameters, unwrap, wrap
from .optim import ReLoRAOptimizer
from .schedule import JaggedCosineLR
from .sst import SSTLinear

__all__ = [
    "ops", "cpu_capability", "LoRALinear", "LoRAEmbedding", "memory_report", "ReLoRAConfig", "wrap", "unwrap", "lora_layers", "print_trainable_parameters",
    "SSTLinear", "ReLoRAOptimizer", "CycleRefused", "JaggedCosineLR",
    "save_checkpoint", "load_checkpoint", "save_sharded", "load_sharded", "save_adapters", "load_adapters",
    "atomic_save", "save_pretrained", "merged_state_dict", "export_peft_adapter", "ReLoRACallback",
    "effective_rank", "update_spectrum", "UpdateTracker", "TrainingStats", "optimizer_state_bytes",
]
__version__ = "0.1.0"


_HF_NAMES = ("save_pretrained", "export_peft_adapter", "ReLoRACallback")


def __getattr__(name):
    # relora_ext.hf imports transformers (when installed) for its TrainerCallback: load it on first use only
    if name in _HF_NAMES:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'relora_ext' has no attribute {name!r}")
