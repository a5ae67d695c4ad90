"""The MPO ablation preset (configs/experiment/mpo_ablation.yaml) is the grid the README promises: every
preference loss the README lists, with and without the quality and generation terms, each grid point
accepted by the config check and giving a finite loss and gradient through the MPO objective."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.train.helpers import tiny_model
from tests.train.objectives.test_mpo import make_pairs
from vlmtune.configs import CONFIG_DIR
from vlmtune.data.collate import collate_pairs
from vlmtune.train.objectives.mpo import LENGTH_NORMALISED, MPOObjective, check_mpo_config, response_logps
from vlmtune.train.objectives.preference import PREFERENCE_LOSSES, LogProbs
from vlmtune.train.runtime.config import compose_config, register_schemas

REPO = Path(__file__).resolve().parents[3]
PRESET = Path(CONFIG_DIR) / "experiment" / "mpo_ablation.yaml"


def readme_losses() -> list[str]:
    """The preference losses README.md's "Preference optimisation (MPO)" section lists."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Preference optimisation (MPO)", 1)[1].split("\n## ", 1)[0]
    listing = re.search(r"preference \(DPO (.*?)each checked against TRL\)", section, re.S)
    assert listing, "the README's list of preference losses moved: update this test's reader"
    return re.findall(r"`([a-z_]+)`", listing.group(1))


def sweep() -> dict[str, list[str]]:
    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose("mpo", overrides=["experiment=mpo_ablation"], return_hydra_config=True)
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def grid_loss(*overrides: str):
    """The ``loss`` config one run of the multirun gets (its output dir, a sweep interpolation, set)."""
    return compose_config("mpo", ["experiment=mpo_ablation", "train.output_dir=sweep_run", *overrides]).loss


def test_the_readme_list_is_read_and_every_listed_loss_exists():
    listed = readme_losses()
    assert len(listed) >= 10 and listed[0] == "sigmoid"
    assert set(listed) <= set(PREFERENCE_LOSSES), sorted(set(listed) - set(PREFERENCE_LOSSES))


def test_the_ablation_sweeps_every_loss_the_readme_lists():
    """A loss may stay out of the grid only when the grid's settings cannot run it (the config check refuses
    it there) and the preset says so; exo_pair, which needs label_smoothing > 0, is the one such case."""
    grid = sweep()["loss.preference"]
    preset_text = PRESET.read_text(encoding="utf-8")
    missing = [name for name in readme_losses() if name not in grid]
    unexplained = []
    for name in missing:
        try:
            check_mpo_config(grid_loss(f"loss.preference={name}"))
        except ValueError:
            if re.search(rf"\b{name}\b", preset_text):
                continue  # cannot run on the grid's settings, and the preset says how to run it
        unexplained.append(name)
    assert not unexplained, (
        f"README.md lists {unexplained} as preference losses of the ablation grid, but "
        f"{PRESET.name} does not sweep them (its loss.preference: {','.join(grid)})"
    )


def test_the_grid_has_the_quality_and_generation_terms_on_and_off():
    grid = sweep()
    assert (
        set(map(float, grid["loss.quality_weight"])) >= {0.0}
        and max(map(float, grid["loss.quality_weight"])) > 0
    )
    assert set(map(float, grid["loss.generation_weight"])) >= {0.0}
    assert max(map(float, grid["loss.generation_weight"])) > 0


@pytest.fixture
def one_thread():
    """The tiny model's ops on one thread: two intra-op threads on a busy 2-core machine run 8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_grid_point_is_accepted_and_trains_with_its_loss(one_thread):
    """Each run the multirun would start: its loss config (composed per preference loss, the weights of the
    grid point set on it) passes check_mpo_config; at the grid's corners (preference term alone, every term
    on) one MPO loss on a tiny model's pairs (a stand-in reference) is finite, has finite gradients, and its
    preference term is the named loss's (whatever the weights)."""
    grid = sweep()
    model = tiny_model().eval()
    batch = collate_pairs(make_pairs(model), "tree", "token")
    ref = torch.tensor([[-20.0, -25.0], [-18.0, -12.0], [-9.0, -30.0]])
    with torch.no_grad():
        policy = response_logps(model, batch)[0]
    lp = LogProbs(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1])
    lengths = batch["response_lengths"].clamp(min=1)
    weights = list(itertools.product(grid["loss.quality_weight"], grid["loss.generation_weight"]))
    assert len(weights) == 4
    corners = [
        min(weights, key=lambda w: tuple(map(float, w))),
        max(weights, key=lambda w: tuple(map(float, w))),
    ]
    for preference in grid["loss.preference"]:
        assert preference in PREFERENCE_LOSSES, f"{preference}: not a loss of train/objectives/preference.py"
        composed = grid_loss(f"loss.preference={preference}")
        assert composed.preference == preference
        extra = {}
        if preference in LENGTH_NORMALISED:
            extra = {"chosen_lengths": lengths[:, 0], "rejected_lengths": lengths[:, 1]}
        kwargs = {"label_smoothing": composed.label_smoothing} if composed.label_smoothing else {}
        expected = PREFERENCE_LOSSES[preference](lp, beta=composed.beta, **kwargs, **extra).mean().item()
        for quality, generation in weights:
            cfg = dataclasses.replace(
                composed, quality_weight=float(quality), generation_weight=float(generation)
            )
            check_mpo_config(cfg)
            if (quality, generation) not in corners:
                continue
            objective = MPOObjective(cfg, reference=lambda b, shared: ref, share_vision=True)
            model.zero_grad()
            loss, metrics = objective(model, batch, objective.weight_totals(batch))
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            point = (preference, quality, generation)
            assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads), point
            assert metrics["loss/preference"] == pytest.approx(expected, rel=1e-5, abs=1e-7), point


@pytest.mark.parametrize("name", ["exo_pair"])
def test_a_loss_left_out_of_the_grid_runs_with_the_setting_the_preset_names(name):
    check_mpo_config(grid_loss(f"loss.preference={name}", "loss.label_smoothing=1e-3"))
