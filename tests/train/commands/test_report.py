"""`vlmtune report` on a hand-made sweep; the MPO ablation preset and MPO config checks."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vlmtune.configs import CONFIG_DIR
from vlmtune.train.commands.report import main as report_main
from vlmtune.train.objectives.mpo import MPOLossConfig, check_mpo_config
from vlmtune.train.runtime.config import register_schemas


def _fake_run(root, name, preference, losses, accuracies, eval_accuracy=None):
    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create(
            {"loss": {"preference": preference, "beta": 0.1}, "train": {"output_dir": str(run)}}
        ),
        run / "config.yaml",
    )
    lines = [
        {"step": i + 1, "loss": lo, "rewards/accuracy": acc, "rewards/margin": 0.1 * (i + 1)}
        for i, (lo, acc) in enumerate(zip(losses, accuracies))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if eval_accuracy is not None:
        (run / "eval.json").write_text(json.dumps({"accuracy": eval_accuracy}))


def test_report_table_and_plot(tmp_path):
    _fake_run(tmp_path, "a", "sigmoid", [1.0, 0.8, 0.5] * 4, [0.5] * 11 + [0.9], eval_accuracy=0.75)
    _fake_run(tmp_path, "b", "ipo", [2.0, 1.5, 1.0], [0.4, 0.5, 0.6])
    assert report_main([str(tmp_path)]) == 0
    table = (tmp_path / "report.md").read_text()
    # named by what differs (the preference loss), not by the output dir
    assert "| preference=sigmoid | 12 | 0.5000 | 0.9000 | 1.2000 | 0.7500 |" in table
    assert "| preference=ipo | 3 | 1.0000 | 0.6000 | 0.3000 | - |" in table
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mpo_ablation_preset_sweeps_the_grid():
    register_schemas()
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("mpo", overrides=["experiment=mpo_ablation"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert set(params["loss.preference"].split(",")) >= {
        "sigmoid",
        "ipo",
        "hinge",
        "bco_pair",
        "nca_pair",
        "apo_zero",
    }
    assert params["loss.quality_weight"] == "0.0,0.2" and params["loss.generation_weight"] == "0.0,1.0"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"preference": "dpo"}, "unknown"),
        ({"preference": "exo_pair"}, "label_smoothing"),
        ({"quality_weight": -1.0}, "quality_weight"),
        ({"generation_reduction": "mean"}, "loss_reduction"),
    ],
)
def test_mpo_config_refused_at_start(fields, message):
    with pytest.raises(ValueError, match=message):
        check_mpo_config(MPOLossConfig(**fields))
