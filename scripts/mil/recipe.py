"""Training recipes: the optimiser a model is trained with, as data.

The protocol trains every model with one recipe, the paper's (Adam, ``learning_rate`` 5e-4, ``weight_decay`` 1e-4:
``train_recipe: shared`` in configs/train.yaml). A head from the field also declares the recipe its authors published
(:meth:`scripts.mil.base.MILBase.published_recipe`), used with ``train_recipe: published``:

* ABMIL (Ilse et al. 2018): Adam 5e-4, weight decay 1e-4, the shared recipe itself;
* TransMIL (Shao et al. 2021, ``Camelyon/TransMIL.yaml``): Lookahead (alpha 0.5, k 6) around RAdam, 2e-4, weight
  decay 1e-5 decoupled and not on biases or 1-d parameters (the timm optimiser factory the code uses);
* CLAM-SB (Lu et al. 2021, the README's commands): Adam 2e-4, weight decay 1e-5;
* MONAI ``MILModel`` (MONAI's pathology MIL tutorial): AdamW 3e-5 without weight decay, cosine annealing to 0 over
  the epochs; ``att_trans`` / ``att_trans_pyramid`` train their transformer blocks at 6e-6 with weight decay 0.1.

:mod:`scripts.workflows.optim` builds the optimiser and schedule of a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

#: optimisers a recipe may name (``torch.optim`` classes)
OPTIMISERS = ("Adam", "AdamW", "RAdam")


@dataclass(frozen=True)
class ParamGroup:
    """Parameters under the given submodule names (attributes of the model) trained at their own rate / decay."""

    modules: Tuple[str, ...]
    learning_rate: float
    weight_decay: float


@dataclass(frozen=True)
class TrainingRecipe:
    """An optimiser and its settings.

    Args:
        name: where it comes from (``shared``, or the model's paper / code).
        optimizer: one of :data:`OPTIMISERS`.
        learning_rate / weight_decay: of every parameter outside ``groups``.
        groups: submodules trained at other settings (MONAI's transformer group).
        decoupled_decay: weight decay as AdamW applies it (RAdam's ``decoupled_weight_decay``).
        no_decay_on_1d: no weight decay on biases and 1-d parameters (norms), as timm's optimiser factory.
        lookahead: Lookahead around the optimiser (k, alpha), or None.
        schedule: ``cosine`` (annealing to 0 over ``max_epochs``, stepped per epoch) or None (constant).
    """

    name: str
    optimizer: str
    learning_rate: float
    weight_decay: float
    groups: Tuple[ParamGroup, ...] = field(default_factory=tuple)
    decoupled_decay: bool = False
    no_decay_on_1d: bool = False
    lookahead: Optional[Tuple[int, float]] = None
    schedule: Optional[str] = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMISERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMISERS)}, got {self.optimizer!r}")
        if self.schedule not in (None, "cosine"):
            raise ValueError(f"schedule must be None or 'cosine', got {self.schedule!r}")

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``AdamW lr 3e-05 wd 0, transformer lr 6e-06 wd 0.1, cosine``."""
        parts = [f"{'Lookahead-' if self.lookahead else ''}{self.optimizer} lr {self.learning_rate:g} wd {self.weight_decay:g}"]
        parts += [f"{'+'.join(g.modules)} lr {g.learning_rate:g} wd {g.weight_decay:g}" for g in self.groups]
        if self.schedule:
            parts.append(self.schedule)
        return f"{self.name}: " + ", ".join(parts)


def shared_recipe(learning_rate: float, weight_decay: float) -> TrainingRecipe:
    """The protocol's recipe: Adam at ``learning_rate`` / ``weight_decay`` for every parameter, no schedule."""
    return TrainingRecipe("shared", "Adam", float(learning_rate), float(weight_decay))


#: TransMIL's published optimiser (see the module docstring)
TRANSMIL = TrainingRecipe("TransMIL (Shao et al. 2021)", "RAdam", 2e-4, 1e-5, decoupled_decay=True, no_decay_on_1d=True,
                          lookahead=(6, 0.5))
#: CLAM's published optimiser
CLAM = TrainingRecipe("CLAM (Lu et al. 2021)", "Adam", 2e-4, 1e-5)
#: ABMIL's published optimiser (the shared recipe's values)
ABMIL = TrainingRecipe("ABMIL (Ilse et al. 2018)", "Adam", 5e-4, 1e-4)


def monai_recipe(transformer_modules: Tuple[str, ...]) -> TrainingRecipe:
    """MONAI's MIL tutorial: AdamW 3e-5, no decay, cosine; the given transformer submodules at 6e-6, decay 0.1."""
    groups = (ParamGroup(tuple(transformer_modules), 6e-6, 0.1),) if transformer_modules else ()
    return TrainingRecipe("MONAI MIL tutorial", "AdamW", 3e-5, 0.0, groups=groups, schedule="cosine")
