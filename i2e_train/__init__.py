"""i2e-train: train spiking neural networks on I2E event data (Ma et al., AAAI 2026).

The layout, the data flow and what each package may import: ARCHITECTURE.md.
"""

from __future__ import annotations

from i2e_train.config import config_dir, register_resolvers

__version__ = "0.1.0"
__all__ = ["config_dir", "__version__"]

register_resolvers()  # ${i2e.catalog:...} and ${i2e.paper_top1:...} in every config
