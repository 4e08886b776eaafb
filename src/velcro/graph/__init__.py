"""The model as a graph: capture (torch.fx) and site discovery.

``trace`` captures a model once; ``find_sites`` lists its activation *sites*, the units that
calibration observes and plans compress; ``insert_after_sites`` is the one rewrite that
calibration and ``apply`` share. :mod:`velcro.graph.layers` finds the layer behind each site
(producer, batch-norm, residual addend) and :mod:`velcro.graph.fingerprint` ties statistics
and plans to the model they came from.

Example:
    >>> gm = velcro.graph.trace(velcro.models.resnet18())
    >>> [s.name for s in velcro.graph.find_sites(gm)][:2]
    ['relu', 'layer1.0.relu:0']
"""

from velcro.graph.capture import trace
from velcro.graph.sites import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    PRODUCER_FUNCTIONS,
    PRODUCER_MODULES,
    TRANSPARENT_FUNCTIONS,
    TRANSPARENT_MODULES,
    Site,
    find_sites,
    insert_after_sites,
    site_nodes,
)

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
    "ACTIVATION_MODULES",
    "PRODUCER_FUNCTIONS",
    "PRODUCER_MODULES",
    "TRANSPARENT_FUNCTIONS",
    "TRANSPARENT_MODULES",
    "Site",
    "find_sites",
    "insert_after_sites",
    "site_nodes",
    "trace",
]
