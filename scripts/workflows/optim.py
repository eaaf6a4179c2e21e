"""The optimiser and learning-rate schedule of a training run, built from a :class:`scripts.mil.recipe.TrainingRecipe`.

``train_recipe`` in configs/train.yaml picks the recipe (:func:`recipe_for`): ``shared`` (every model: Adam at
``learning_rate`` / ``weight_decay``, the paper's protocol and the default) or ``published`` (a head from the field:
its authors' optimiser; every other model: the shared recipe). :func:`build_optimizer` and :func:`build_schedule` turn
it into torch objects; both save and load their state, so a killed run resumes with the same schedule.

:class:`Lookahead` is written here because neither torch nor the bundle's dependencies have it (timm, which does, is
an optional extra); it is the algorithm of Zhang et al. (NeurIPS 2019) that TransMIL's published optimiser wraps
around RAdam.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, List, Optional

import torch
from torch import nn

from scripts.mil.recipe import TrainingRecipe, shared_recipe

logger = logging.getLogger("csmil.training")

#: values of ``train_recipe``
RECIPES = ("shared", "published")


def _unwrap(network: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (its submodules name the parameter groups)."""
    return getattr(network, "module", network)


def recipe_for(network: nn.Module, train_recipe: str, learning_rate: float, weight_decay: float) -> TrainingRecipe:
    """The recipe ``network`` trains with: the shared one (``learning_rate``, ``weight_decay``) or, with
    ``train_recipe='published'``, the model's own where it declares one (``published_recipe``)."""
    if train_recipe not in RECIPES:
        raise ValueError(f"train_recipe must be one of {', '.join(RECIPES)}, got {train_recipe!r}")
    shared = shared_recipe(learning_rate, weight_decay)
    own = getattr(_unwrap(network), "published_recipe", lambda: None)() if train_recipe == "published" else None
    recipe = own or shared
    if train_recipe == "published":
        logger.info("training recipe %s", recipe.describe() if own else recipe.describe() + " (the model publishes none of its own)")
    return recipe


def _param_groups(model: nn.Module, recipe: TrainingRecipe) -> List[dict]:
    """Parameter groups of ``recipe``: the declared submodules' groups after the rest (the main group); with
    ``no_decay_on_1d`` each group split into decayed and undecayed (biases, 1-d parameters) parameters."""
    claimed: dict[int, int] = {}
    for i, group in enumerate(recipe.groups):
        for name in group.modules:
            sub = getattr(model, name, None)
            if not isinstance(sub, nn.Module):
                raise ValueError(f"recipe {recipe.name!r} names submodule {name!r}, which {type(model).__name__} does not have")
            for p in sub.parameters():
                claimed.setdefault(id(p), i)
    settings = [(recipe.learning_rate, recipe.weight_decay)] + [(g.learning_rate, g.weight_decay) for g in recipe.groups]
    buckets: list[list[tuple[str, nn.Parameter]]] = [[] for _ in settings]
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[claimed[id(p)] + 1 if id(p) in claimed else 0].append((name, p))
    out = []
    for (lr, wd), params in zip(settings, buckets):
        if recipe.no_decay_on_1d:
            flat = [p for n, p in params if p.dim() <= 1 or n.endswith(".bias")]
            rest = [p for n, p in params if not (p.dim() <= 1 or n.endswith(".bias"))]
            out += [{"params": flat, "lr": lr, "weight_decay": 0.0}, {"params": rest, "lr": lr, "weight_decay": wd}]
        else:
            out.append({"params": [p for _, p in params], "lr": lr, "weight_decay": wd})
    return [g for g in out if g["params"]]


def build_optimizer(network: nn.Module, recipe: TrainingRecipe) -> Any:
    """The optimiser of ``recipe`` over ``network``'s parameters (the shared recipe: ``torch.optim.Adam(
    network.parameters(), lr, weight_decay)``, as the bundle always built it)."""
    cls = getattr(torch.optim, recipe.optimizer)
    kwargs = {"decoupled_weight_decay": True} if recipe.optimizer == "RAdam" and recipe.decoupled_decay else {}
    plain = not recipe.groups and not recipe.no_decay_on_1d
    params: Iterable = network.parameters() if plain else _param_groups(_unwrap(network), recipe)
    optimizer = cls(params, lr=recipe.learning_rate, weight_decay=recipe.weight_decay, **kwargs)
    if recipe.lookahead:
        k, alpha = recipe.lookahead
        return Lookahead(optimizer, k=k, alpha=alpha)
    return optimizer


def build_schedule(optimizer: Any, recipe: TrainingRecipe, max_epochs: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """The per-epoch learning-rate schedule of ``recipe`` (cosine: annealed to 0 over ``max_epochs``), or None."""
    if recipe.schedule != "cosine":
        return None
    return torch.optim.lr_scheduler.CosineAnnealingLR(getattr(optimizer, "optimizer", optimizer), T_max=int(max_epochs), eta_min=0.0)


class Lookahead:
    """Lookahead (Zhang et al. 2019) around ``optimizer``: every ``k`` steps the slow weights move ``alpha`` of the
    way to the fast ones and the fast weights restart from them. Slow weights start at the initial weights (the
    paper; timm's version starts them at the first synchronisation).

    Duck-types the optimiser interface the trainers use (``step``, ``zero_grad``, ``param_groups``,
    ``state_dict`` / ``load_state_dict``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        self.optimizer, self.k, self.alpha = optimizer, int(k), float(alpha)
        self.steps = 0
        self.slow = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for slow, fast in zip(self.slow, self._params()):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "steps": self.steps, "slow": [s.clone() for s in self.slow]}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps = int(state["steps"])
        for slow, saved in zip(self.slow, state["slow"]):
            slow.copy_(saved)

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.optimizer!r})"
