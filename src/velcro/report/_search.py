"""The report's search section: how the plan was chosen, checked, and what it does on unseen
images (the trade-off of C against the validation loss), so that a lucky search is not
mistaken for a saving."""

from __future__ import annotations

from collections.abc import Mapping

from velcro._format import objective_label
from velcro.report._plots import COLOURS, _figure, _png
from velcro.report._tables import Table, count, pct, points

LOSS_LABELS = {"agreement": "top-1 predictions changed (%)", "kl": "mean KL divergence (nats)",
               "accuracy": "top-1 lost (points)"}


def _loss_scale(criterion: str) -> float:
    return 1.0 if criterion == "kl" else 100.0


def trajectory_figure(trajectory: list[dict], criterion: str, tolerance: float,
                      check_path: list[dict] | None = None) -> bytes:
    """Every candidate: its loss under the criterion against C, feasible ones highlighted,
    and the points tested on the held-back check images."""
    figure = _figure(6.4, 3.8)
    axes = figure.add_subplot(1, 1, 1)
    scale = _loss_scale(criterion)
    rows = [r for r in trajectory if r["phase"] != "baseline" and r.get("criterion_loss")
            is not None]
    for feasible, colour, label in ((False, "#bbbbbb", "infeasible"),
                                    (True, COLOURS["element"], "feasible")):
        chosen = [r for r in rows if r["feasible"] == feasible]
        axes.scatter([100 * r["saving_ratio"] for r in chosen],
                     [scale * r["criterion_loss"] for r in chosen], s=14, color=colour,
                     label=f"{label} (search images)")
    for passed, marker, label in ((True, "^", "check passed"), (False, "v", "check failed")):
        tested = [r for r in check_path or [] if r["passed"] == passed]
        if tested:
            axes.scatter([100 * r["saving_ratio"] for r in tested],
                         [scale * r["criterion_loss"] for r in tested], s=46, marker=marker,
                         facecolors="none", edgecolors=COLOURS["channel"], label=label)
    axes.axhline(scale * tolerance, color="grey", linestyle=":", label="tolerance")
    axes.set_xlabel("compression-saving ratio C (%)")
    axes.set_ylabel(LOSS_LABELS.get(criterion, "loss"))
    axes.set_title(f"Search: {len(rows)} candidates (point estimates)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def tradeoff_figure(tradeoff: list[dict]) -> bytes:
    """Validation top-1 change (95% CI) and agreement against C for the back-off path."""
    figure = _figure(9.0, 3.6)
    ordered = sorted(tradeoff, key=lambda p: p["saving_ratio"])
    x = [100 * p["saving_ratio"] for p in ordered]
    left = figure.add_subplot(1, 2, 1)
    centre = [100 * p["difference"] for p in ordered]
    errors = [[100 * (p["difference"] - p["ci95"][0]) for p in ordered],
              [100 * (p["ci95"][1] - p["difference"]) for p in ordered]]
    left.errorbar(x, centre, yerr=errors, color=COLOURS["element"], marker="o", capsize=3,
                  label="plans of the back-off path")
    left.axhline(0.0, color="grey", linestyle=":")
    right = figure.add_subplot(1, 2, 2)
    right.plot(x, [100 * p["agreement"] for p in ordered], color=COLOURS["element"],
               marker="o")
    for p in ordered:
        if p["chosen"]:
            left.scatter([100 * p["saving_ratio"]], [100 * p["difference"]], marker="*", s=180,
                         color=COLOURS["channel"], zorder=3, label="chosen plan")
            right.scatter([100 * p["saving_ratio"]], [100 * p["agreement"]], marker="*",
                          s=180, color=COLOURS["channel"], zorder=3)
    left.set_xlabel("compression-saving ratio C (%)")
    left.set_ylabel("validation top-1 change (points)")
    left.legend(fontsize=7)
    right.set_xlabel("compression-saving ratio C (%)")
    right.set_ylabel("top-1 agreement with the original (%)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    figure.suptitle("Trade-off on the validation images (never used to choose)", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def _loss_text(criterion: str, value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if criterion == "kl" else pct(value)


def search_parts(search: dict, costs: Mapping | None, figure) -> list:
    """The search section's tables and figures; ``figure(name, png, caption)`` registers one;
    ``costs`` (from :func:`velcro.report.measure_costs`) adds the MACs the trimmed model saves."""
    settings = search.get("settings", {})
    criterion = search.get("criterion", "accuracy")
    confidence = search.get("confidence")
    phases = settings.get("evaluations_per_phase", {})
    bound = "point estimate" if confidence is None else f"one-sided {pct(confidence, 0)} bound"
    objective = search["objective"]
    rows = [[f"objective (maximised on the search split): {objective_label(objective)}",
             pct(search["objective_value"])]]
    if costs and costs.get("saved_by") == "trimmed model" and costs["original"]["macs"]:
        saved = 1 - int(costs["compressed"]["macs"]) / int(costs["original"]["macs"])
        rows.append(["MACs saved by the trimmed model (velcro.cost)", pct(saved)])
    rows += [["criterion", f"{criterion} ({bound}, paired with the uncompressed model)"],
            ["tolerance", _loss_text(criterion, search["tolerance"])
             + (" nats" if criterion == "kl" else "")],
            ["search images", count(search.get("search_images"))],
            ["evaluations", count(search["evaluations"])],
            ["per phase", ", ".join(f"{k} {v}" for k, v in phases.items()) or "–"],
            ["wall time", f"{search['wall_time_s']:.1f} s"]]
    share = settings.get("graph_share_run")
    if share is not None:
        rows.append(["graph run per evaluation (cached activations)", pct(share, 1)])
    check = search.get("check")
    if check:
        searched = settings.get("searched_saving_ratio")
        verdict = "failed: backed off" if check["backed_off"] else "passed"
        rows += [["check images (held back from the search)", count(check["images"])],
                 ["searched C, on the check images", f"{pct(searched)} ({verdict})"
                  if searched is not None else verdict]]
    parts: list = [Table("Threshold search", ["", "value"], rows, "ll")]
    if objective == "macs":
        parts.append(("note", "MACs in replaced producers: the share of the model's MACs in "
                              "the layers whose outputs the plan replaces, the quantity the "
                              "search maximised; the MACs a trimmed model really saves are "
                              "counted on that model (velcro.cost) and can differ."))
    if search.get("trajectory"):
        parts.append(figure("search.png", trajectory_figure(
            search["trajectory"], criterion, search["tolerance"],
            (check or {}).get("path")),
            "Every candidate the search evaluated (search images), and the back-off path "
            "tested on the check images"))
    if check and check.get("path"):
        parts.append(Table(
            "Check on the held-back images (ascending C, stop at the first failure)",
            ["C", "loss", "bound", "agreement", "top-1", "passed"],
            [[pct(r["saving_ratio"]), _loss_text(criterion, r["criterion_loss"]),
              _loss_text(criterion, r["bound"]), pct(r["agreement"]),
              pct(r["accuracy"]) if r.get("accuracy") is not None else "–",
              "yes" if r["passed"] else "no"] for r in check["path"]], "rrrrrl"))
    tradeoff = (search.get("validation") or {}).get("tradeoff") or []
    if tradeoff:
        parts.append(figure("tradeoff.png", tradeoff_figure(tradeoff),
                            "C against the change of validation top-1 (95% CI, paired) and "
                            "the top-1 agreement, for the plans of the back-off path"))
        parts.append(Table(
            "Trade-off on the validation images",
            ["C", "top-1 change (95% CI)", "lost / gained", "agreement", "check", "chosen"],
            [[pct(p["saving_ratio"]),
              f"{points(p['difference'])} [{points(p['ci95'][0])}, {points(p['ci95'][1])}]",
              f"{p['lost']} / {p['gained']}", pct(p["agreement"]),
              {True: "passed", False: "failed", None: "–"}[p["passed"]],
              "yes" if p["chosen"] else ""]
             for p in sorted(tradeoff, key=lambda p: p["saving_ratio"])], "rrrrll"))
    return parts
