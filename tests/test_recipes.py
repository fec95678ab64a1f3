"""Named recipes: the default is the book's recipe, `paper` is method.md §4, and both turn into the
keyword arguments of distill.sfm."""
from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from sfm_lib import distill, recipes
from sfm_lib.augment import Augment
from sfm_lib.stats import ClassStats

BOOK = Path(__file__).resolve().parents[1] / "book"


def test_the_default_is_the_books_recipe():
    """Every distilling chapter reads its settings from one `recipe` parameter whose default is the default
    recipe, with no override and no copy of a recipe setting among its parameters (one place for the
    defaults)."""
    import papermill as pm

    r = recipes.get()
    assert r.name == recipes.DEFAULT == "fmnist-lite0-64"
    settings = set(r.settings()) - {"steps"}  # steps stays a chapter's size knob (0: the recipe's)
    for chapter in ["02_flow_matching.ipynb", "03_evaluation.ipynb", "04_vs_gradient_matching.ipynb",
                    "05_classifier_inheritance.ipynb"]:
        declared = pm.inspect_notebook(str(BOOK / chapter))
        assert eval(declared["recipe"]["default"]) == recipes.DEFAULT, chapter
        assert eval(declared["recipe_overrides"]["default"]) == {}, chapter
        assert not settings & set(declared), (chapter, settings & set(declared))
    assert r.lr == distill.DEFAULT_LR["pixels"] == 0.05 and r.schedule == "constant"


def test_the_recipes_hold_the_stated_settings():
    """Written out by hand from the book's parameters and README, and from method.md §4."""
    book = dict(steps=500, augs=2, ema=0.7, init="real", crop_scale=0.3, noise_p=0.0, param="pixels", lr=0.05,
                schedule="constant", grow_every=200)
    paper = dict(steps=5000, augs=1, ema=0.0, init="noise", crop_scale=0.08, noise_p=0.5, param="pyramid",
                 lr=2e-3, schedule="constant", grow_every=200)
    assert recipes.get("fmnist-lite0-64").settings() == book
    assert recipes.get("paper").settings() == paper
    assert recipes.get("paper").augment() == Augment()  # the papers' augmentation is Augment's default


def test_sfm_kwargs_are_arguments_of_distill_sfm():
    signature = inspect.signature(distill.sfm)
    for name in recipes.RECIPES:
        kw = recipes.sfm_kwargs(name)
        signature.bind_partial(None, None, **kw)  # raises TypeError on a name sfm() does not take
        r = recipes.get(name)
        assert kw["augment"] == Augment(scale=(r.crop_scale, 1.0), noise_p=r.noise_p)
        assert ("grow_every" in kw) == (r.param == "pyramid")
        assert {k: kw[k] for k in ["steps", "augs", "ema", "init", "param", "lr", "schedule"]} == {
            k: getattr(r, k) for k in ["steps", "augs", "ema", "init", "param", "lr", "schedule"]}


def test_the_augment_matches_the_experiments_shorthand():
    """experiments.distilled builds its Augment from crop_scale/noise_p by replacing Augment()'s fields:
    the recipe's Augment is the same object."""
    r = recipes.get()
    shorthand = dataclasses.replace(Augment(), scale=(r.crop_scale, 1.0), noise_p=r.noise_p)
    assert r.augment() == shorthand


def test_overrides_none_is_unset_and_the_name_says_what_changed():
    base = recipes.get("paper")
    assert recipes.get("paper", steps=None, lr=None) == base
    assert recipes.get("paper", steps=5000) == base  # an override equal to the recipe changes nothing
    r = recipes.get("paper", steps=300, noise_p=0.0)
    assert (r.steps, r.noise_p, r.lr) == (300, 0.0, 2e-3)
    assert r.name == "paper + steps=300, noise_p=0.0"
    assert recipes.sfm_kwargs("paper", noise_p=0.0)["augment"].noise_p == 0.0


def test_describe_names_every_setting():
    line = recipes.describe("paper", steps=300)
    assert "\n" not in line
    for part in ["paper + steps=300", "300 steps", "pyramid", "every 200 steps", "lr 0.002", "constant",
                 "init noise", "1 view", "ema 0", "crop 0.08-1", "noise p 0.5", "ImageNet"]:
        assert part in line, part
    assert "every" not in recipes.describe()  # no pyramid in the default


def test_a_run_at_other_steps_is_the_run_that_get_makes_with_those_steps():
    built = recipes.run("fmnist-lite0-64", {"lr": 0.01}, steps=200, crop=32)
    again = built.at_steps(1000)
    assert again == recipes.run("fmnist-lite0-64", {"lr": 0.01}, steps=1000, crop=32)
    assert again.recipe.name == "fmnist-lite0-64 + lr=0.01, steps=1000" and "1000 steps" in again.describe()
    assert built.at_steps(500).recipe == recipes.get("fmnist-lite0-64", lr=0.01)  # the recipe's own steps
    with pytest.raises(ValueError, match="steps must be ≥ 1, got 0"):
        built.at_steps(0)


@pytest.mark.parametrize("kw, message", [
    (dict(name="nope"), "unknown recipe 'nope'"),
    (dict(colour="red"), "not settings of a recipe: colour"),
    (dict(ema=1.0), "ema must lie in [0, 1)"),
    (dict(init="centroid"), "init must be one of noise, real"),
    (dict(crop_scale=0.0), "crop_scale must lie in (0, 1]"),
    (dict(steps=-1), "steps must be ≥ 0, got -1"),
])
def test_bad_recipes_are_refused_with_a_clear_message(kw, message):
    name = kw.pop("name", None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        recipes.get(name, **kw)


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_a_recipe_runs_in_distill_sfm(name, lite0, fmnist_train, single_thread):
    """Two steps of each recipe through distill.sfm on toy statistics of Fashion-MNIST's 10 classes (init
    "real" takes its images); the result records the recipe's settings."""
    C = len(fmnist_train.classes)
    means = torch.randn(C, lite0.feature_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = ClassStats(means, torch.full((C,), 5), list(fmnist_train.classes),
                       {"backbone": lite0.name, "feature_dim": lite0.feature_dim, "resolution": 32})
    kw = recipes.sfm_kwargs(name, steps=2)
    extra = {"init_dataset": fmnist_train} if kw["init"] == "real" else {}
    out = distill.sfm(lite0, stats, ipc=1, resolution=32, progress=False, **kw, **extra)
    r = recipes.get(name)
    assert out.images.shape == (C, 3, 32, 32)
    assert out.meta["lr"] == r.lr and out.meta["ema"] == r.ema and out.meta["param"] == r.param
    assert out.meta["augment"]["scale"] in ([r.crop_scale, 1.0], (r.crop_scale, 1.0))
