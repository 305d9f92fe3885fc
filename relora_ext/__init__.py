"""relora_ext: ReLoRA* training for PyTorch with native C kernels.

Importing the package loads ``relora_ext._C``, which registers the ``torch.ops.relora`` operators;
``relora_ext.ops`` wraps them with argument checks.
"""

import torch  # noqa: F401  (loads libtorch before _C links against it)

from . import _C  # noqa: F401  (registers torch.ops.relora.*)
from . import ops

__all__ = ["ops"]
__version__ = "0.1.0"
