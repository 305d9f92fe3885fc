"""relora_ext: ReLoRA* training for PyTorch with native C kernels.

Importing the package loads ``relora_ext._C``, which registers the ``torch.ops.relora`` operators;
``relora_ext.ops`` wraps them with argument checks. The training API builds on those ops:
``LoRALinear``/``wrap``/``unwrap`` (lora.py), ``ReLoRAOptimizer`` (optim.py), ``JaggedCosineLR``
(schedule.py), atomic checkpoints (checkpoint.py) and the update-spectrum / training-stats helpers
(analysis.py). Multi-process support (DDP, FSDP2) is in ``relora_ext.distributed``.
"""

import torch  # noqa: F401  (loads libtorch before _C links against it)

from . import _C  # noqa: F401  (registers torch.ops.relora.*)
from . import ops
from .analysis import TrainingStats, UpdateTracker, effective_rank, optimizer_state_bytes, update_spectrum
from .checkpoint import atomic_save, load_checkpoint, save_checkpoint
from .lora import LoRALinear, lora_layers, unwrap, wrap
from .optim import ReLoRAOptimizer
from .schedule import JaggedCosineLR

__all__ = [
    "ops", "LoRALinear", "wrap", "unwrap", "lora_layers", "ReLoRAOptimizer", "JaggedCosineLR",
    "save_checkpoint", "load_checkpoint", "atomic_save", "effective_rank", "update_spectrum",
    "UpdateTracker", "TrainingStats", "optimizer_state_bytes",
]
__version__ = "0.1.0"
