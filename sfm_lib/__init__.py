"""sfm_lib: dataset distillation for frozen pre-trained backbones by Statistical Flow Matching (SFM).

Modules, one concept each: ``data`` (datasets), ``backbones`` (frozen φ), ``features`` (one streaming
pass, feature cache), ``stats`` (class means), ``flow`` (flows and the SFM loss), ``images``
(synthetic-image parameterisations), ``augment`` (differentiable augmentation), ``distill``
(SFM/LGM loops), ``evaluate`` (linear probes, baselines), ``cli`` (``python -m sfm_lib``).
"""
__version__ = "0.1.0"

from . import progress as _progress  # noqa: F401,E402  first: quiets tqdm before timm imports it
