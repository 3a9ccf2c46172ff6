"""Recipes: compression methods as stages, an ordered list of them validated before anything runs."""

from fxslice.recipes.recipe import Calibration, Recipe, RecipeResult, resolve_stage
from fxslice.recipes.stage import CAPTURED, KV_CACHE, Stage, StageContext, StageResult

__all__ = ["CAPTURED", "KV_CACHE", "Calibration", "Recipe", "RecipeResult", "Stage", "StageContext", "StageResult", "resolve_stage"]
