"""The report's result-dependent prose: for each study stage, the sentence that says what happened and why,
written separately for each outcome (the default held by more than the noise / within it, another level
won by more than the noise / within it). build.py measures the outcome; nothing here reads files.

Every function takes an `Outcome` (build.outcome) and returns plain English; the level names it uses are
already display names (name()).
"""
from __future__ import annotations

import plots
import run_experiments

WORDS = plots.DISPLAY_NAMES


def name(study: str, variant) -> str:
    """Display name of a level: 'leaky_relu' -> 'Leaky ReLU', '5' (kernel) -> '5×5', '256 relu p0.3' ->
    '256 ReLU, dropout 0.3'."""
    v = str(variant)
    if study == "cnn_kernel" and v.isdigit():
        return f"{v}×{v}"
    if study == "mlp_depth" and v == "0":
        return "no hidden layer"
    if study == "mlp_depth" and v.isdigit():
        return f"{v} layer{'s' if v != '1' else ''}"
    if "," in v and all(t.strip().isdigit() for t in v.split(",")):
        return "-".join(t.strip() for t in v.split(","))
    if v.split() and all(t[:1] == "x" and t[1:].isdigit() for t in v.split()):
        return "widths " + " ".join("×" + t[1:] for t in v.split())
    out = []
    for tok in v.replace(",", " ,").split():
        low = tok.lower()
        if low.startswith("p") and low[1:].replace(".", "").isdigit():
            out.append(f"dropout {tok[1:]}")
        elif low == "bn" and out and out[-1] == "no":
            out.append("BatchNorm")
        else:
            out.append(WORDS.get(low, tok))
    return " ".join(out).replace(" ,", ",").replace("ReLU dropout", "ReLU, dropout").replace(
        "GELU dropout", "GELU, dropout")


def _vs(o) -> str:
    """'(91.20% against 90.85%, a gap of 0.35 points; noise: 0.12)' -- the numbers behind a comparison."""
    return f"({o.best_acc} against {o.other_acc}; {o.gap} points apart, noise {o.noise})"


# ------------------------------------------------------------------------------------------ MLP stages
def mlp_activation(o) -> str:
    if o.kind == "default_clear":
        s = (f"{o.default} stayed on top, ahead of {o.other} {_vs(o)}. Its derivative is exactly one wherever a "
             f"unit is active, so the backward signal reaches the first layer undiminished.")
    elif o.kind == "default_close":
        s = (f"{o.default} and {o.other} cannot be told apart {_vs(o)}; the two non-saturating units pass "
             f"gradients alike, so the choice between them matters little here.")
    elif o.kind == "other_clear":
        why = {"GELU": "its smooth gate weights each input by the chance that it is positive, so small "
                       "negative inputs still pass some gradient",
               "Leaky ReLU": "its small negative slope keeps every unit learning",
               "Tanh": "its zero-centred output keeps the next layer's inputs balanced",
               "sigmoid": "its bounded output acts as a regulariser at this budget"}.get(o.best, "")
        s = f"{o.best} beat the default {o.default} {_vs(o)}" + (f": {why}." if why else ".")
    else:
        s = (f"{o.best} finished ahead of the default {o.default} by less than the noise {_vs(o)}, "
             f"so the activations at the top are equivalent at this budget.")
    if o.worst in ("sigmoid", "Tanh") and o.worst not in (o.best, o.other):
        fit = f"; {o.worst_train} on its training images" if o.worst_train != "–" else ""
        s += (f" {o.worst} came last ({o.worst_acc}{fit}): a saturating unit's derivative peaks at 1 (1/4 for "
              f"the sigmoid) and vanishes as the unit saturates, so it learns more slowly in the same epochs.")
    return s


def mlp_depth(o) -> str:
    if o.kind == "default_clear":
        deeper = o.up
        return (f"{o.default} beat {o.other} {_vs(o)}. " + (
            "The extra layer adds parameters that this budget cannot train to advantage."
            if deeper else "One layer fewer leaves too little capacity to separate similar garments."))
    if o.kind == "default_close":
        return (f"Depth hardly matters between {o.default} and {o.other} {_vs(o)}: a wide hidden layer already "
                f"holds most of what the data need.")
    if o.kind == "other_clear":
        return (f"{o.best} beat the default {o.default} {_vs(o)}: " + (
            "a deeper stack composes features the shallower one could not." if o.up else
            "the shallower network is easier to optimise in the same number of steps."))
    return f"{o.best} edged out {o.default} by less than the noise {_vs(o)}: depth is not the lever here."


def mlp_width(o) -> str:
    if o.kind == "default_clear":
        return (f"Width {o.default} beat width {o.other} {_vs(o)}; " + (
            "the wider layer's extra units went to fitting the training images, not to generalising."
            if o.up else "the narrower layer underfits."))
    if o.kind == "default_close":
        return f"Widths {o.default} and {o.other} give the same accuracy within the noise {_vs(o)}."
    if o.kind == "other_clear":
        return (f"Width {o.best} beat the default {o.default} {_vs(o)}, {o.cost}: " + (
            "more units per layer kept paying off." if o.up else
            "fewer units regularised the network better at this budget."))
    return f"Width {o.best} led the default {o.default} by less than the noise {_vs(o)}."


def mlp_dropout(o) -> str:
    if o.kind == "default_clear":
        return (f"Dropout {o.default} held against {o.other} {_vs(o)}: " + (
            "more dropout removes too much signal for the epochs available." if o.up else
            "less dropout lets the network memorise the training images."))
    if o.kind == "default_close":
        return f"Dropout {o.default} and {o.other} are within the noise of each other {_vs(o)}."
    if o.kind == "other_clear":
        return (f"Dropout {o.best} beat the default {o.default} {_vs(o)}: " + (
            "the network needed more regularisation than the default gave it." if o.up else
            "the default dropped more units than this budget can afford."))
    return f"Dropout {o.best} came first, inside the noise of the default {o.default} {_vs(o)}."


def _optimizer_why(winner: str, loser: str) -> str:
    adaptive = ("Adam", "AdamW")
    if winner in adaptive and loser not in adaptive:
        return "per-parameter step sizes adapt to the very different gradient scales of the layers"
    if winner == "AdamW" and loser == "Adam":
        return "decoupled weight decay regularises without being rescaled by the adaptive step"
    if winner == "Adam" and loser == "AdamW":
        return "at this budget the decoupled weight decay held the fit back more than it regularised"
    if winner not in adaptive and loser in adaptive:
        return "at a learning rate suited to it, momentum SGD generalised better than the adaptive step"
    return "the two momentum variants differ only in where the gradient is evaluated"


def mlp_optimizer(o) -> str:
    if o.kind == "default_clear":
        return f"{o.default} beat {o.other} {_vs(o)}: {_optimizer_why(o.default, o.other)}."
    if o.kind == "default_close":
        return (f"{o.other} came within the noise of {o.default} {_vs(o)}: each at its own learning rate, "
                f"the two reach the same accuracy on this problem.")
    if o.kind == "other_clear":
        return f"{o.best} beat the default {o.default} {_vs(o)}: {_optimizer_why(o.best, o.default)}."
    return (f"{o.best} finished ahead of the default {o.default} by less than the noise {_vs(o)}: the "
            f"optimisers tried are interchangeable here.")


def mlp_lr(o) -> str:
    if o.kind == "default_clear":
        return (f"A learning rate of {o.default} beat {o.other} {_vs(o)}: " + (
            "the larger step makes the loss oscillate before the schedule decays it." if o.up else
            "the smaller step leaves the network under-trained in the same number of epochs."))
    if o.kind == "default_close":
        return f"Learning rates {o.default} and {o.other} reach the same accuracy within the noise {_vs(o)}."
    if o.kind == "other_clear":
        return (f"A learning rate of {o.best} beat the default {o.default} {_vs(o)}: " + (
            "larger steps cover more ground within the budget." if o.up else
            "smaller steps avoided overshooting."))
    return f"A learning rate of {o.best} led {o.default} by less than the noise {_vs(o)}."


# ------------------------------------------------------------------------------------------ CNN stages
def cnn_pool(o) -> str:
    if o.kind == "default_clear":
        return (f"{o.default} beat {o.other} {_vs(o)}: keeping the strongest response in each window keeps "
                f"edges and texture that averaging blurs.")
    if o.kind == "default_close":
        return f"{o.default} and {o.other} are equivalent here {_vs(o)}."
    if o.kind == "other_clear":
        why = ("averaging the whole last map discards position, which a garment's class barely depends on, "
               "and shrinks the head" if o.best == "global average pooling" else
               "averaging keeps more of each window's evidence than its maximum")
        return f"{o.best} beat {o.default} {_vs(o)}: {why}."
    return f"{o.best} came first, within the noise of {o.default} {_vs(o)}."


def cnn_kernel(o) -> str:
    if o.kind == "default_clear":
        return (f"{o.default} kernels beat {o.other} {_vs(o)}, {o.cost} of {o.other}: " + (
            "two stacked small kernels see as far as one large one with fewer weights and one more "
            "non-linearity." if o.up else "a kernel this small cannot see the edges and textures between "
                                          "neighbouring pixels."))
    if o.kind == "default_close":
        return (f"{o.default} and {o.other} kernels are indistinguishable {_vs(o)}, so the kernel size is "
                f"a matter of cost here ({o.default}: {o.cost} of {o.other}).")
    if o.kind == "other_clear":
        return (f"{o.best} kernels beat {o.default} {_vs(o)}, {o.cost} of {o.default}: " + (
            "the wider context per layer paid off." if o.up else "the smaller kernel overfits less."))
    return f"{o.best} kernels led {o.default} by less than the noise {_vs(o)}, {o.cost} of {o.default}."


def cnn_filters(o) -> str:
    if o.kind == "default_clear":
        return (f"At equal multiply-adds the {o.default} schedule beat {o.other} {_vs(o)}: adding channels "
                f"where pooling shrinks the maps keeps the compute per layer balanced.")
    if o.kind == "default_close":
        return (f"At equal multiply-adds the filter schedules {o.default} and {o.other} perform alike "
                f"{_vs(o)}: the total compute, not its distribution over layers, sets the accuracy.")
    if o.kind == "other_clear":
        return f"At equal multiply-adds, {o.best} beat the default {o.default} {_vs(o)}."
    return f"At equal multiply-adds, {o.best} led the default {o.default} by less than the noise {_vs(o)}."


def cnn_init(o) -> str:
    if o.kind == "default_clear":
        return f"With BatchNorm, {o.default} initialisation beat {o.other} {_vs(o)}."
    if o.kind == "default_close":
        return (f"With BatchNorm the initialisation hardly matters: {o.default} and {o.other} are within the "
                f"noise {_vs(o)}, because each layer's output is rescaled to unit variance whatever the "
                f"weights' scale.")
    if o.kind == "other_clear":
        return f"With BatchNorm, {o.best} initialisation beat the default {o.default} {_vs(o)}."
    return (f"With BatchNorm, {o.best} initialisation led {o.default} by less than the noise {_vs(o)}: "
            f"normalisation undoes the weights' scale.")


def cnn_head_mode(o) -> str:
    if o.kind in ("default_clear", "other_clear"):
        winner = o.default if o.kind == "default_clear" else o.best
        why = ("the features adapt to the head that classifies them" if winner == "joint training" else
               "the backbone trains with a simple linear head and the scratch MLP then fits fixed features "
               "without disturbing them")
        return f"{winner} beat {o.other if winner == o.default else o.default} {_vs(o)}: {why}."
    return (f"Joint training and frozen features end within the noise {_vs(o)}: at this compute the head "
            f"has little left to learn either way.")


def cnn_head(o) -> str:
    if o.kind == "default_clear":
        return (f"A head of {o.default} hidden units beat {o.other} {_vs(o)}: " + (
            "the wider head fits the training features more closely without generalising better." if o.up else
            "the narrower head is too small to recombine the features."))
    if o.kind == "default_close":
        return (f"Head widths {o.default} and {o.other} end within the noise {_vs(o)}: on good features the "
                f"classifier has little left to learn.")
    if o.kind == "other_clear":
        return (f"A head of {o.best} hidden units beat the default {o.default} {_vs(o)}: " + (
            "more capacity in the classifier paid off." if o.up else "a smaller classifier generalised better."))
    return f"A head of {o.best} hidden units led the default {o.default} by less than the noise {_vs(o)}."


STAGES = {"mlp_activation": mlp_activation, "mlp_depth": mlp_depth, "mlp_width": mlp_width,
          "mlp_dropout": mlp_dropout, "mlp_optimizer": mlp_optimizer, "mlp_lr": mlp_lr,
          "cnn_pool": cnn_pool, "cnn_kernel": cnn_kernel, "cnn_filters": cnn_filters, "cnn_init": cnn_init,
          "cnn_head_mode": cnn_head_mode, "cnn_head": cnn_head}

TITLES = {stage.id: stage.title for stage in run_experiments.STAGES}


def stage_sentence(study: str, o) -> str:
    fn = STAGES.get(study)
    if fn is None:  # a stage this report does not know: say the numbers, no explanation
        return f"{o.best} came first {_vs(o)}."
    return fn(o)
