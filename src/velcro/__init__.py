"""velcro: value-locality compression of pretrained CNNs for specialized tasks.

Pipeline: ``calibrate`` -> :class:`Stats` -> ``plan`` (or ``search``) -> :class:`Plan` ->
``apply`` (reference semantics) or ``trim`` (a smaller model with the same outputs).

Example:
    >>> import velcro
    >>> model = velcro.models.create("resnet18", weights="resnet18.pth")
    >>> stats = velcro.calibrate(model, calibration_loader)
    >>> plan = velcro.plan(stats, 0.3, granularity="channel")
    >>> small = velcro.apply(model, plan)
"""

# The verbs share their module's name (velcro.plan is both); importing the functions here,
# after their modules, makes the package attribute the function.
from velcro import hardware, models
from velcro.apply import apply
from velcro.calibrate import calibrate
from velcro.cost import Cost, cost
from velcro.errors import VelcroError
from velcro.evaluate import Report, evaluate
from velcro.export import export_onnx
from velcro.graph import find_sites, trace
from velcro.hardware import kernels
from velcro.plan import Plan, plan
from velcro.report.sweep import sweep
from velcro.search import SearchResult, search
from velcro.stats import Stats
from velcro.trim import load_trimmed, save_trimmed, trim

__version__ = "0.1.0"

__all__ = [
    "Cost",
    "Plan",
    "Report",
    "SearchResult",
    "Stats",
    "VelcroError",
    "apply",
    "calibrate",
    "cost",
    "evaluate",
    "export_onnx",
    "find_sites",
    "hardware",
    "kernels",
    "load_trimmed",
    "models",
    "plan",
    "save_trimmed",
    "search",
    "sweep",
    "trace",
    "trim",
]
